"""The report: targets judged against the measured figures, the printed table, the plot and the JSON.

`targets` lists each target with its measured value and met / not met; they are printed, never
asserted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bt_fast.errors import say
from bt_fast.files import write_json
from bt_fast.plots import quiet_matplotlib
from tools.bench.conversion import FORMATS as CONVERSION_FORMATS
from tools.bench.conversion import TARGET_SHARE

TARGETS = {"ffcv_vs_floor": 1.15, "ffcv_device_decode_vs_floor": 0.1, "augment_speedup": 4.0, "lars_speedup": 2.0,
           "device_crop_share": 0.01}
# Arithmetic, not a measurement: an H100 SXM's dense float16/bfloat16 tensor-core peak (NVIDIA's data sheet)
# and the rate one GPU must feed (8 GPUs at about 2,000 Barlow Twins images/s each).
H100_DENSE_HALF_FLOPS = 989e12
IMAGES_PER_S_PER_GPU = 2000


def evaluate_targets(result: dict) -> list[dict]:
    loaders, aug, opt = result["loaders"], result["augment"], result["optimizer"]
    targets = []
    for name, key in (("ffcv", "ffcv_vs_floor"), ("ffcv_device_decode", "ffcv_device_decode_vs_floor")):
        entry = loaders.get(name, {})
        value = entry.get("vs_decode_floor")
        note = "device is the CPU: includes the device-side work" if entry.get("host_cpu_includes_device_work") else ""
        targets.append({"target": f"{name} host stage <= {TARGETS[key]}x its decode floor", "value": value,
                        "met": None if value is None else value <= TARGETS[key],
                        "note": note or ("" if value is not None else entry.get("unavailable", "not measured"))})
    crop = result.get("device_crop", {})
    if crop:
        ops = list(crop["ops_per_batch"].items())
        targets.append({"target": "device crop op count flat in the batch size", "value": float(ops[1][1]),
                        "met": ops[0][1] == ops[1][1],
                        "note": f"ops per batch at {ops[0][0]} / {ops[1][0]} images: {ops[0][1]} / {ops[1][1]}"})
        share = crop["flops_per_image"] * IMAGES_PER_S_PER_GPU / H100_DENSE_HALF_FLOPS
        targets.append({"target": f"device crop FLOPs at {IMAGES_PER_S_PER_GPU} images/s < "
                                  f"{TARGETS['device_crop_share']:.0%} of an H100 (arithmetic)",
                        "value": share * 100, "met": share < TARGETS["device_crop_share"],
                        "note": f"{crop['flops_per_image'] / 1e9:.2f} GFLOP/image at {crop['image_size']} px from a "
                                f"{crop['slot'][0]}x{crop['slot'][1]} slot, in % of {H100_DENSE_HALF_FLOPS / 1e12:.0f} "
                                f"TFLOP/s dense half precision"})
    ref = loaders.get("reference", {}).get("vs_decode_floor")
    targets.append({"target": "reference host cost vs decode floor (baseline, ~12-15x expected)", "value": ref,
                    "met": None, "note": "baseline, no target"})
    sp = aug.get("speedup")
    targets.append({"target": f"augmentation >= {TARGETS['augment_speedup']}x kornia", "value": sp,
                    "met": None if sp is None else sp >= TARGETS["augment_speedup"],
                    "note": "" if sp is not None else (aug.get("ours", {}).get("unavailable")
                                                       or aug.get("kornia_unavailable", "not measured"))})
    probe = opt.get("ops_growth_probe", {})
    flat = bool(probe) and len(set(probe.get("foreach", []))) == 1
    fused_flat = opt.get("fused_ops_per_step", 0) < opt.get("tensors", 0)
    ls = opt.get("speedup")
    targets.append({"target": f"LARS (compiled) >= {TARGETS['lars_speedup']}x the per-parameter loop, "
                              "op count not growing with #tensors", "value": ls,
                    "met": None if ls is None else (ls >= TARGETS["lars_speedup"] and flat and fused_flat),
                    "note": (f"foreach ops at {probe.get('tensors')} tensors: {probe.get('foreach')} "
                             f"(loop: {probe.get('reference')}); fused: {opt.get('fused_ops_per_step')} ops "
                             f"for {opt.get('tensors')} tensors")})
    return targets


def _fmt(figure: Any, scale: float = 1.0, digits: int = 1) -> str:
    if isinstance(figure, dict) and "median" in figure:
        m, lo, hi = (figure[k] * scale for k in ("median", "min", "max"))
        return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"
    if isinstance(figure, (int, float)):
        return f"{figure * scale:.{digits}f}"
    return "-"


def _loader_lines(result: dict) -> list[str]:
    env, floor, loaders = result["environment"], result["decode_floor"], result["loaders"]
    lines = [f"Decode floor: {floor['decoder']}; originals "
             f"{_fmt(floor['cpu_s_per_image'], 1000, 2)} ms CPU/image over {floor['images']} images", ""]
    head = (f"{'loader':<18} {'images/s':>22} {'host CPU ms/image':>22} {'decode floor ms':>20} {'host/floor':>10}"
            f" {'CPU ms/image incl. device aug':>30}")
    lines += [head, "-" * len(head)]
    for name, entry in loaders.items():
        if "unavailable" in entry:
            lines.append(f"{name:<18} unavailable: {entry['unavailable']}")
            continue
        own = floor.get(name, {})
        star = " *" if entry.get("host_cpu_includes_device_work") else ""
        lines.append(f"{name:<18} {_fmt(entry['images_per_s']):>22} {_fmt(entry['host_cpu_s_per_image'], 1000, 2):>22}"
                     f" {_fmt(own.get('cpu_s_per_image'), 1000, 2):>20} {_fmt(entry.get('vs_decode_floor'), 1, 1) + 'x':>10}"
                     f" {_fmt(entry.get('cpu_s_per_image_incl_device_work'), 1000, 2):>30}{star}")
    lines.append("  host CPU = this process + its worker processes, per image delivered"
                 + ("; on this CPU device, a pipeline with a separate host stage (host_batches()) is measured without its "
                    "device augmentation (last column: with it)" if env["device"] == "cpu" else ""))
    if any(e.get("host_cpu_includes_device_work") for e in loaders.values()):
        lines.append("  * device is the CPU: the device-side augmentation runs on the host and is included")
    return lines


def _augment_lines(aug: dict) -> list[str]:
    line = (f"Augmentation ({aug['batch_size']} x {aug['image_size']} px, both views): ours "
            f"{_fmt(aug.get('ours_images_per_s'))} images/s"
            + (f" ({aug['ours']['unavailable']})" if "ours" in aug else "")
            + f", kornia {_fmt(aug['kornia_images_per_s'])} images/s"
            + (f" ({aug['kornia_unavailable']})" if "kornia_unavailable" in aug else "")
            + f", speedup {_fmt(aug.get('speedup'), 1, 2)}x")
    for label, name, speedup in (("compiled", "ours_compiled", "compiled_speedup"),
                                 ("fused Triton", "ours_triton", "triton_speedup")):  # when measured (augment.py)
        if f"{name}_images_per_s" in aug:
            line += (f"; {label} {_fmt(aug[f'{name}_images_per_s'])} images/s, "
                     f"speedup {_fmt(aug.get(speedup), 1, 2)}x")
        elif name in aug:
            line += f"; {label} unavailable: {aug[name]['unavailable']}"
    return [line]


def _optimizer_lines(opt: dict) -> list[str]:
    lines = [f"LARS step ({opt['model']}: {opt['parameters'] / 1e6:.1f} M parameters, {opt['tensors']} tensors)"]
    for label, key, ops in (("per-parameter loop", "reference_ms", "reference_ops_per_step"),
                            ("foreach", "foreach_ms", "foreach_ops_per_step"),
                            ("compiled", "fused_ms", "fused_ops_per_step")):
        lines.append(f"  {label:<20} {_fmt(opt[key]):>26} ms  {opt[ops]:>6} ops/step")
    lines.append(f"  speedup vs loop: compiled {_fmt(opt['speedup'], 1, 2)}x, foreach {_fmt(opt['foreach_speedup'], 1, 2)}x;"
                 f" compile {opt['fused_compile_s']:.1f} s (excluded)")
    lines.append(f"  ops counted: {opt['ops_counted']}")
    return lines


def _train_step_lines(ts: dict, names: list[str]) -> list[str]:
    synthetic = ts["synthetic_images_per_s"]
    rate = f"unavailable: {synthetic['unavailable']}" if "unavailable" in synthetic else f"{_fmt(synthetic)} images/s"
    lines = [f"Training step ({ts['model']}, {ts['image_size']} px, batch {ts['batch_size']}, amp {ts['amp']}):"
             f" synthetic {rate}"]
    for name in names:
        entry = ts.get(name)
        if entry is None:
            continue
        if "unavailable" in entry or "skipped" in entry:
            lines.append(f"  {name:<18} " + (f"unavailable: {entry['unavailable']}" if "unavailable" in entry
                                             else f"skipped: {entry['skipped']}"))
        else:
            lines.append(f"  {name:<18} {_fmt(entry['images_per_s']):>24} images/s, data stall "
                         f"{_fmt(entry['data_stall_fraction'], 100, 0)} %")
    return lines


def _device_crop_lines(crop: dict) -> list[str]:
    if not crop:
        return []
    ops = ", ".join(f"{n} images: {c}" for n, c in crop["ops_per_batch"].items())
    return [f"Device crop ({crop['compute_dtype']}, {crop['image_size']} px from a {crop['slot'][0]}x{crop['slot'][1]} "
            f"slot, {crop['slot_from']}): {_fmt(crop['images_per_s'])} images/s (both views), "
            f"{crop['flops_per_image'] / 1e9:.2f} GFLOP/image, ops per batch {ops}"]


def end_to_end_lines(section: dict) -> list[str]:
    """The end-to-end table: per pipeline its rate, the synthetic-input rate, their ratio, data wait, host cores."""
    lines = [f"End to end ({section['model']}, {section['image_size']} px, {section['batch_size']} images per view, "
             f"amp {section['amp']}; {section['steps']} timed steps after {section['warmup_steps']} warm-up; "
             f"{section['device']}, {section['timeline']})"]
    head = (f"{'pipeline':<20} {'mode':<27} {'images/s':>9} {'synthetic':>10} {'vs synth.':>9} {'data wait':>9}"
            f" {'host cores':>10} {'peak GiB':>9}")
    lines += [head, "-" * len(head)]
    for name, entry in section.items():
        if not isinstance(entry, dict):
            continue
        if "unavailable" in entry:
            lines.append(f"{name:<20} unavailable: {entry['unavailable']}")
            continue
        peak = entry.get("peak_gpu_memory_gib")
        lines.append(f"{name:<20} {entry['mode'] or '-':<27} {entry['images_per_s']:>9.1f}"
                     f" {entry['synthetic']['images_per_s']:>10.1f} {entry['vs_synthetic']:>9.2f}"
                     f" {entry['data_wait_fraction']:>9.1%} {entry['host_cores_busy']:>10.2f}"
                     f" {'-' if peak is None else f'{peak:.1f}':>9}")
    lines.append("  host cores = CPU seconds of the process, its threads and loader workers per wall second; "
                 "data wait = time the step waited for its batch / step time")
    return lines


def conversion_lines(section: dict) -> list[str]:
    """The conversion table and its target, per format."""
    floor = section["decode_floor"]["cpu_s_per_image"]
    lines = [f"Conversion of {section['images']} images ({section['data']}), --workers {section['workers']}, "
             f"{section['reps']} reps (median [min-max]); decode floor {floor['median'] * 1e3:.3f} ms "
             f"[{floor['min'] * 1e3:.3f}-{floor['max'] * 1e3:.3f}], so the target "
             f"{TARGET_SHARE} x {section['workers']} / floor is {section['target_images_per_s']:.0f} images/s"]
    head = f"{'format':<8} {'images/s':>22} {'CPU ms/image':>13} {'vs floor':>9} {'vs target':>10} {'peak MiB':>9}"
    lines += [head, "-" * len(head)]
    for fmt in CONVERSION_FORMATS:
        entry = section[fmt]
        rate, cpu = entry["images_per_s"], entry["cpu_s_per_image"]
        lines.append(f"{fmt:<8} {rate['median']:>8.0f} [{rate['min']:.0f}-{rate['max']:.0f}] {cpu['median'] * 1e3:>13.3f}"
                     f" {entry['vs_floor']:>9.2f} {entry['vs_target']:>10.2f} {entry['peak_rss_mib']:>9.1f}")
    met = [fmt for fmt in CONVERSION_FORMATS if section[fmt]["vs_target"] >= 1]
    lines.append(f"Target (images/s >= {TARGET_SHARE} x workers / decode floor): "
                 + ", ".join(f"{fmt} {'met' if fmt in met else 'NOT met'}" for fmt in CONVERSION_FORMATS))
    return lines


def _target_lines(targets: list[dict]) -> list[str]:
    lines = ["Targets:"]
    for t in targets:
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"  [{verdict:^7}] {t['target']}: {value}" + (f"  ({t['note']})" if t.get("note") else ""))
    return lines


def format_table(result: dict) -> str:
    """The printed report: every section, median [min-max] for each figure (--end-to-end, --conversion: its table)."""
    if "end_to_end" in result:
        return "\n".join(end_to_end_lines(result["end_to_end"]))
    if "conversion" in result:
        return "\n".join(conversion_lines(result["conversion"]))
    env = result["environment"]
    lines = [f"bt_fast benchmark  device {env['device']} ({env['device_name']}), {env['cpu_count']} CPUs, "
             f"torch {env['torch']}, batch {env['batch_size']}, {env['image_size']} px, {env['reps']} reps "
             "(median [min-max])", ""]
    lines += _loader_lines(result)
    lines += ["", *_device_crop_lines(result.get("device_crop", {}))]
    lines += ["", *_augment_lines(result["augment"])]
    lines += ["", *_optimizer_lines(result["optimizer"])]
    lines += ["", *_train_step_lines(result["train_step"], list(result["loaders"]))]
    lines += ["", *_target_lines(result["targets"])]
    return "\n".join(lines)


def tick_label(name: str) -> str:
    """A loader entry's name on the plot's x axis, one word a line (side by side, the long names overlapped)."""
    return name.replace("_", "\n")


def loader_figure(result: dict):
    """The loaders' throughput and host CPU cost per image, as a matplotlib figure (Agg)."""
    quiet_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    loaders = {k: v for k, v in result["loaders"].items() if "unavailable" not in v}
    names = list(loaders)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))

    def bars(ax, figures: list[dict], scale: float, offset: float = 0.0, width: float = 0.8, **kw):
        med = [f["median"] * scale for f in figures]
        err = [[(f["median"] - f["min"]) * scale for f in figures], [(f["max"] - f["median"]) * scale for f in figures]]
        ax.bar([i + offset for i in range(len(figures))], med, width, yerr=err, capsize=4, **kw)

    if names:
        bars(ax1, [loaders[n]["images_per_s"] for n in names], 1.0, color="tab:blue")
        bars(ax2, [loaders[n]["host_cpu_s_per_image"] for n in names], 1000, -0.2, 0.4, label="host CPU", color="tab:red")
        floors = [result["decode_floor"].get(n, {}).get("cpu_s_per_image") or {"median": 0, "min": 0, "max": 0}
                  for n in names]
        bars(ax2, floors, 1000, 0.2, 0.4, label="decode floor", color="tab:gray")
        ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(names)), [tick_label(n) for n in names])
    env = result["environment"]
    ax1.set_title(f"loader throughput (batch {env['batch_size']}, {env['image_size']} px)")
    ax1.set_ylabel("images/s (two views on the device)")
    ax2.set_title("host CPU cost per image")
    ax2.set_ylabel("CPU ms / image")
    unavailable = [k for k, v in result["loaders"].items() if "unavailable" in v]
    if unavailable:
        fig.text(0.01, 0.01, "unavailable: " + ", ".join(unavailable), fontsize=8)
    fig.suptitle(f"bt_fast bench on {env['device']} ({env['cpu_count']} CPUs); median, bars min-max")
    fig.tight_layout()
    return fig


def plot(result: dict, path: Path) -> None:
    quiet_matplotlib()
    import matplotlib.pyplot as plt
    fig = loader_figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: dict, json_path: Path, plot_path: Path) -> None:
    """Print the table, write the JSON (atomically) and the plot (not for --end-to-end), and say where they are."""
    say(format_table(result))
    write_json(json_path, result)
    if "loaders" in result:
        plot(result, plot_path)
    say(f"\njson: {json_path}" + (f"\nplot: {plot_path}" if "loaders" in result else ""))
