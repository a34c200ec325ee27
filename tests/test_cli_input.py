"""Bad input to the command-line programs: one `error:` line, exit 2, before any work and with nothing written."""
from __future__ import annotations

import importlib
import os
import stat

import pytest
import yaml

from bt_fast.config import ConfigError, load_config
from bt_fast.files import atomic_write, check_output_file
from conftest import write_image_folder
from test_reliability import run_main, tiny_args

COMMANDS = ("bt_fast.train", "tools.convert", "tools.evaluate", "tools.plot", "tools.preview",
            "tools.bench.__main__", "tools.gpu_check.__main__", "tools.make_demo_data", "tools.dali_semantics",
            "tools.launch")


def run_command(module: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("module", COMMANDS)
def test_an_argument_error_is_one_line_not_the_usage_block(module, capsys):
    code, err = run_command(module, ["--no-such-option"], capsys)  # or the required arguments it lacks
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and err[0].endswith(" (see --help)")


@pytest.mark.parametrize("module", COMMANDS)
def test_the_usage_line_names_the_command_as_it_is_typed(module, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    typed = module.removesuffix(".__main__")
    assert capsys.readouterr().out.startswith(f"usage: python -m {typed} ")


OUTPUT_OPTIONS = [("tools.evaluate", "--json"), ("tools.plot", "--out"), ("tools.preview", "--out"),
                  ("tools.bench.__main__", "--json"), ("tools.bench.__main__", "--plot"),
                  ("tools.gpu_check.__main__", "--json"), ("tools.dali_semantics", "--json")]


@pytest.mark.parametrize("module, flag", OUTPUT_OPTIONS)
@pytest.mark.parametrize("where", ["a directory", "below a file"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(module, flag, where, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    target = tmp_path if where == "a directory" else tmp_path / "file" / "out.json"
    # The output option first: argparse checks it as it reads it, before the positional RUN (plot) or the
    # required --data (evaluate) it would otherwise miss, and before anything runs.
    code, err = run_command(module, [flag, str(target)], capsys)
    reason = "Is a directory" if where == "a directory" else "Not a directory"
    assert code == 2 and err == [f"error: argument {flag}: cannot write {target} ({reason}); give a file path in "
                                 f"a writable directory (see --help)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("module, flag", OUTPUT_OPTIONS)
def test_a_named_pipe_given_as_output_is_refused_not_replaced(module, flag, tmp_path, capsys):
    """Outputs are written to a temporary file renamed over the path: a named pipe or a device there was replaced
    by an ordinary file (`tools.plot RUN --out /dev/full`, run as root, replaced the machine's /dev/full)."""
    target = tmp_path / "out.png"
    os.mkfifo(target)
    code, err = run_command(module, [flag, str(target)], capsys)
    assert code == 2 and err == [f"error: argument {flag}: cannot write {target} (it is a named pipe, not a file to "
                                 f"replace); give a file path in a writable directory (see --help)"]
    assert stat.S_ISFIFO(os.lstat(target).st_mode)
    with pytest.raises(OSError, match="it is a named pipe, not a file to replace"):
        atomic_write(target, lambda handle: handle.write(b"png"))
    assert stat.S_ISFIFO(os.lstat(target).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_a_symbolic_link_given_as_output_is_written_through_and_kept(tmp_path):
    target, link = tmp_path / "plots" / "real.png", tmp_path / "link.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link.symlink_to(target)
    check_output_file(link)
    assert atomic_write(link, lambda handle: handle.write(b"new")) == link
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.png", "plots"]


def test_a_run_given_twice_to_the_plot_is_refused(tmp_path, capsys):
    """The two curves shared one label and were drawn as one, exit 0."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    code, err = run_command("tools.plot", [str(tmp_path), str(tmp_path / "metrics.jsonl"), "--out",
                                           str(tmp_path / "plot.png")], capsys)
    assert code == 2 and err == [f"error: run {tmp_path} is given twice; give each run once"]
    assert not (tmp_path / "plot.png").exists()


def test_the_plot_of_a_run_cannot_be_written_over_its_log(tmp_path, capsys):
    """`--out RUN/metrics.jsonl` replaced the run's whole log with a PNG image, exit 0."""
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n')
    code, err = run_command("tools.plot", [str(tmp_path), "--out", str(log)], capsys)
    assert code == 2 and err == [f"error: argument --out: {log} does not end in .png; the image is written as PNG "
                                 f"only, so give a .png file (see --help)"]
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n'


@pytest.mark.parametrize("module, first, second", [
    ("bt_fast.train", ["--config", "configs/demo_cpu.yaml", "--check"], ["--config", "configs/paper_rn50.yaml"]),
    ("tools.convert", ["SRC", "DST", "--format", "ffcv", "--workers", "1"], ["--workers", "2"]),
    ("tools.evaluate", ["--data", "D", "--mode", "knn"], ["--mode", "linear"]),
    # torchrun's options too, before the config (here without data=) is checked
    ("tools.launch", ["--nproc-per-node", "2"], ["--nproc-per-node", "1", "-m", "bt_fast.train", "--config",
                                                 "configs/demo_cpu.yaml"]),
])
def test_an_option_given_twice_with_two_values_is_refused_not_the_last_one_taken(module, first, second, capsys):
    """argparse keeps the last value silently: two --config files trained the second alone, and two
    --nproc-per-node started the second's count of ranks."""
    code, err = run_command(module, first + second, capsys)
    assert code == 2 and err == [f"error: {second[0]} given twice ({first[first.index(second[0]) + 1]} and "
                                 f"{second[1]}); give it once (see --help)"]


def test_the_launcher_refuses_two_configs_as_bt_fast_train_does(capsys):
    from tools import launch
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["-m", "bt_fast.train", "--config", "configs/demo_cpu.yaml", "--config", "configs/paper_rn50.yaml"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --config given twice (configs/demo_cpu.yaml and configs/paper_rn50.yaml); give it once (see --help)"]


def test_an_output_file_may_be_new_in_directories_still_to_create(tmp_path):
    check_output_file(tmp_path / "a" / "b" / "out.json")  # atomic_write creates the directories
    assert list(tmp_path.iterdir()) == []


def config_file_error(text: str, tmp_path) -> tuple:
    """(path, the ConfigError's message) of a config file holding `text`."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return path, str(err.value)


@pytest.mark.parametrize("text, message", [
    ("batch_size: 4\nbatch_size: 8\n", "key 'batch_size' is given twice (lines 1 and 2); give each key once"),
    ("augment:\n  image_size: 32\n  blur_p: 0.1\n  image_size: 64\n",
     "key 'image_size' is given twice (lines 2 and 4); give each key once"),
])
def test_a_key_given_twice_in_a_config_file_is_refused(text, message, tmp_path):
    path, error = config_file_error(text, tmp_path)
    assert error == f"config file {path}: {message}"


def test_a_path_that_starts_with_a_tilde_is_in_the_home_directory(image_folder, tmp_path, monkeypatch, capsys):
    """The shell expands `~` only where it sees it: a config file's `out_dir: ~/runs/x` wrote the run into a
    directory named `~` below the working directory, and the run's last line named "~/runs/x/checkpoint.pth"."""
    import shutil
    home = tmp_path / "home"
    shutil.copytree(image_folder, home / "images")
    monkeypatch.setenv("HOME", str(home))
    config_file = tmp_path / "run.yaml"
    config_file.write_text("out_dir: ~/runs/x\nknn_val: ~/images\n")
    config = load_config(config_file, ["data=~/images", "ffcv.beton=~/images.beton", "dali.records=~"])
    assert (config.out_dir, config.knn_val, config.data) == (f"{home}/runs/x", f"{home}/images", f"{home}/images")
    assert (config.ffcv.beton, config.dali.records) == (f"{home}/images.beton", str(home))
    code, _, err = run_main(capsys, "--check", *tiny_args("~/images", "~/runs/x"))
    assert code == 0 and err == ""
    (home / "my.yaml").write_bytes(open("configs/demo_cpu.yaml", "rb").read())  # --config too ("no such file")
    code, _, err = run_main(capsys, "--check", "--config=~/my.yaml", *tiny_args("~/images", "~/runs/x")[2:])
    assert code == 0 and err == ""
    assert sorted(p.name for p in home.iterdir()) == ["images", "my.yaml"]


def test_the_commands_path_options_read_a_tilde_as_the_home_directory(tmp_path, monkeypatch, capsys):
    """As the config's path keys do: a `~` the shell leaves as typed (quoted, `--data=~/x`, `make eval OUT='~/x'`)
    named a folder `~` below the working directory."""
    from tools import convert, evaluate
    monkeypatch.setenv("HOME", str(tmp_path))
    options = evaluate.build_parser().parse_args(["--data=~/images", "--val-data", "~/val", "--checkpoint", "~/b.pth",
                                                  "--out-dir", "~/ft", "--train-list", "~/list.txt"])
    assert (options.data, options.val_data, options.checkpoint) == tuple(
        str(tmp_path / name) for name in ("images", "val", "b.pth"))
    assert (options.out_dir, options.train_list) == (tmp_path / "ft", tmp_path / "list.txt")
    options = convert.build_parser().parse_args(["~/images", "~/out.beton", "--format", "ffcv"])
    assert (options.src, options.dst) == (str(tmp_path / "images"), str(tmp_path / "out.beton"))
    code, err = run_command("tools.plot", ["~/run", "--out", "~/plot.png"], capsys)
    assert code == 2 and err == [f"error: run {tmp_path / 'run'} has no metrics.jsonl; give a run's out_dir or its "
                                 f"metrics.jsonl"]
    code, err = make_eval(tmp_path, "OUT=~/run", home=tmp_path)
    assert code == 2 and err[0] == (f"error: {tmp_path / 'run'}/checkpoint.pth does not exist: nothing trained there "
                                    f"yet; run make pretrain first (with the same CONFIG= and OUT=)")
    # A `~user` with no such user is refused, as config keys refuse it, not taken as a folder named `~nosuchuser`.
    monkeypatch.chdir(tmp_path)
    code, err = run_command("tools.convert", ["~nosuchuser/images", "out.beton", "--format", "ffcv"], capsys)
    assert code == 2 and err == ["error: argument SRC: ~nosuchuser/images starts with ~nosuchuser but there is no user "
                                 "nosuchuser; give an absolute path (see --help)"]
    code, err = run_command("tools.make_demo_data", ["--imagenet-like", "3", "~nosuchuser/inl"], capsys)
    assert code == 2 and err == ["error: --imagenet-like N DIR: ~nosuchuser/inl starts with ~nosuchuser but there is "
                                 "no user nosuchuser; give an absolute path (see --help)"]
    assert not list(tmp_path.glob("~*"))


def _no_passwd_entry(name_or_uid):
    raise KeyError(f"no passwd entry: {name_or_uid}")


@pytest.mark.parametrize("key", ["data", "out_dir", "knn_train", "knn_val", "ffcv.beton", "dali.records"])
def test_a_tilde_with_no_known_home_is_refused_not_a_folder_named_tilde(key, monkeypatch):
    """A uid with no passwd entry and no $HOME: os.path.expanduser leaves the `~`, and `out_dir=~/runs/x`
    wrote the run into <working directory>/~/runs/x while it reported ~/runs/x/checkpoint.pth."""
    import pwd
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", _no_passwd_entry)
    monkeypatch.setattr(pwd, "getpwnam", _no_passwd_entry)
    for value in ("~", "~/runs/x"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={value}"])
        assert str(err.value) == (f"config key '{key}' starts with ~ but the home directory is unknown (HOME is "
                                  f"unset); set HOME or give an absolute path")
    with pytest.raises(ConfigError) as err:  # another user's home, where there is no such user
        load_config(None, [f"{key}=~nosuchuser/runs/x"])
    assert str(err.value) == (f"config key '{key}' starts with ~nosuchuser but there is no user nosuchuser; "
                              f"give an absolute path")
    section, _, name = key.rpartition(".")
    config = load_config(None, [f"{key}=runs/~/x"])  # a `~` inside a path is a folder's name
    assert getattr(getattr(config, section) if section else config, name) == "runs/~/x"


def test_a_tilde_with_no_known_home_is_one_error_line_of_the_training_command(image_folder, monkeypatch, capsys):
    import pwd
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", _no_passwd_entry)
    code, out, err = run_main(capsys, "--check", *tiny_args(image_folder, "~/runs/x"))
    assert (code, out) == (2, "")
    assert err == ("error: config key 'out_dir' starts with ~ but the home directory is unknown (HOME is unset); "
                   "set HOME or give an absolute path\n")


def test_a_config_file_that_is_not_text_or_is_a_directory_is_named(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\xff\xfe")
    with pytest.raises(ConfigError, match=f"^config file {binary} is not UTF-8 text; give a YAML file"):
        load_config(binary)
    with pytest.raises(ConfigError, match=f"^config file {tmp_path} is a directory; give a YAML file"):
        load_config(tmp_path)


@pytest.mark.parametrize("seed, accepted", [(0, True), (2**32 - 1, True), (2**32, False), (-1, False),
                                            (10**20, False)])
def test_seeds_are_the_32_bit_values_the_generators_take(seed, accepted):
    # Beyond 32 bits two seeds would give the same run (the pipelines' generators keep the low 32 bits);
    # 10**20 overflowed torch.manual_seed with a traceback.
    if accepted:
        assert load_config(overrides=[f"seed={seed}"]).seed == seed
    else:
        with pytest.raises(ConfigError, match="config key 'seed'.*0..4294967295"):
            load_config(overrides=[f"seed={seed}"])


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--reps", "-2"], "--reps must be at least 1, got -2"),
    (["--image-size", "0"], "--image-size must lie in 8..1024 pixels, got 0"),
    (["--image-size", "100000"], "--image-size must lie in 8..1024 pixels, got 100000"),
    (["--train-image-size", "1025"], "--train-image-size must lie in 8..1024 pixels, got 1025"),
    (["--projector", "abc"], "--projector takes layer widths joined by '-', e.g. 8192-8192-8192; got 'abc'"),
    (["--child-timeout", "-1"], "--child-timeout must be a positive number of seconds, got -1.0"),
    # a --set of these measured other settings than the report and the JSON state (128 px, batch 32)
    (["--set", "augment.image_size=16"], "--set augment.image_size=... would change a setting the report states; "
                                         "use --image-size or --train-image-size"),
    (["--set", "ffcv.beton=x.beton", "--set", " ffcv.crop = host"], "--set ffcv.crop=... would change a setting the "
                                                                    "report states; use --pipelines (its ffcv entries "
                                                                    "are the modes)"),
])
def test_bench_refuses_sizes_out_of_range_and_a_bad_projector_as_it_starts(argv, message, capsys):
    from tools.bench.__main__ import parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message} (see --help)"]


@pytest.mark.parametrize("size", ["0", "1025", "100000"])
def test_evaluate_refuses_an_image_size_that_cannot_work_before_any_work(size, tmp_path, capsys):
    # 100000 px went on to resize every image to 114286 px a side, until the out-of-memory killer ended a
    # DataLoader worker and the error advised fewer workers.
    argv = ["--random-init", "--arch", "resnet18", "--data", str(tmp_path / "missing"), "--workers", "0"]
    code, err = run_command("tools.evaluate", [*argv, "--image-size", size], capsys)
    assert code == 2 and err == [f"error: --image-size must lie in 1..1024 pixels, got {size} (see --help)"]
    # the bounds themselves pass, on to the first check of the work: the data directory
    for bound in ("1", "1024"):
        code, err = run_command("tools.evaluate", [*argv, "--image-size", bound], capsys)
        assert code == 2 and err == [f"error: data directory {tmp_path / 'missing'} does not exist; pass --data DIR "
                                     f"with train/ and val/ sub-folders"]


@pytest.mark.parametrize("value, message", [
    ("0", "--nproc-per-node must be at least 1, got 0"),
    ("abc", "--nproc-per-node abc: Unsupported nproc_per_node value: abc; give a number of processes, or auto, "
            "cpu or gpu"),
])
def test_the_launcher_refuses_a_bad_process_count_in_one_line(value, message, image_folder, tmp_path, capsys):
    code, err = run_command("tools.launch", ["--nproc-per-node", value, "-m", "bt_fast.train",
                                             *tiny_args(image_folder, tmp_path / "run")], capsys)
    assert code == 2 and err == [f"error: {message}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("launcher, message", [
    # torch's AssertionError, the launcher's own ZeroDivisionError, int()'s ValueError: each a traceback
    (["--max-restarts", "-1"], "--max-restarts must be at least 0, got -1"),
    (["--nnodes", "0"], "--nnodes must be at least 1, got 0"),
    (["--nnodes", "abc"], "--nnodes abc: give a number of nodes, or a range MIN:MAX of them"),
    (["--nnodes", "3:2"], "--nnodes 3:2: give a range MIN:MAX with 1 <= MIN <= MAX"),
    (["--nnodes", "0:2"], "--nnodes 0:2: give a range MIN:MAX with 1 <= MIN <= MAX"),
    (["--monitor-interval", "-1"], "--monitor-interval must be a positive number of seconds, got -1.0"),
    (["--node-rank", "-1"], "--node-rank must be at least 0, got -1"),
    (["--shutdown-timeout", "-5"], "--shutdown-timeout must be at least 0, got -5"),
    (["--master-port", "70000"], "--master-port must be a port number, 1..65535, got 70000"),
    # torchrun's parser printed its usage block
    (["--max-restarts", "abc"], "argument --max-restarts/--max_restarts: invalid int value: 'abc' (see --help)"),
    (["--nproc-per-node", "2", "--bogus", "1"], "unrecognized arguments: --bogus 1 (see --help)"),
])
def test_the_launcher_refuses_a_bad_torchrun_option_in_one_line_before_the_config(launcher, message, capsys):
    """Checked first: a config without data= is refused too, and used to be all the user heard of."""
    code, err = run_command("tools.launch", [*launcher, "-m", "bt_fast.train", "--config", "configs/demo_cpu.yaml"],
                            capsys)
    assert code == 2 and err == [f"error: {message}"]


ENDPOINT = "give HOST:PORT, the host name or address of node 0 and a port number up to 65535"
NODE_0 = "does not resolve on this host; give the host name or address of node 0"


@pytest.mark.parametrize("launcher, message", [
    # torchrun's tracebacks once it started (a ValueError, a NotADirectoryError), or its silent wait for a host
    (["--rdzv-endpoint", "localhost:99999", "--nnodes", "2"], f"--rdzv-endpoint localhost:99999: {ENDPOINT}"),
    (["--rdzv-endpoint", "localhost:abc"], f"--rdzv-endpoint localhost:abc: {ENDPOINT}"),
    (["--rdzv-endpoint", ":29562"], f"--rdzv-endpoint :29562: {ENDPOINT}"),
    (["--rdzv-endpoint", "localhost", "--nnodes", "2"], f"--rdzv-endpoint localhost: {ENDPOINT}"),  # static: no port
    (["--rdzv-backend", "c10d", "--rdzv-endpoint", "nonexistent.invalid:29562", "--nnodes", "2"],
     f"--rdzv-endpoint nonexistent.invalid:29562: nonexistent.invalid {NODE_0}"),
    (["--master-addr", "nonexistent.invalid", "--nnodes", "2", "--node-rank", "0", "--master-port", "29563"],
     f"--master-addr nonexistent.invalid {NODE_0}"),
    (["--rdzv-backend", "foo"], "--rdzv-backend foo is no rendezvous backend; give one of c10d, etcd, etcd-v2, static"),
    (["--rdzv-conf", "foo"], "--rdzv-conf foo: give KEY=VALUE,... (for example join_timeout=900,is_host=true)"),
    (["--rdzv-conf", "join_timeout=abc"], "--rdzv-conf join_timeout=abc: join_timeout must be an integer, got abc"),
    (["--rdzv-conf", "is_host=maybe"], "--rdzv-conf is_host=maybe: is_host must be true or false, got maybe"),
    (["--redirects", "9"], "--redirects 9: give 0, 1, 2 or 3 (nothing, stdout, stderr, both), or that for each local "
                           "rank, as LOCAL_RANK:N,... (for example 0:3,1:2)"),
    (["--tee", "x"], "--tee x: give 0, 1, 2 or 3 (nothing, stdout, stderr, both), or that for each local rank, as "
                     "LOCAL_RANK:N,... (for example 0:3,1:2)"),
    (["--local-ranks-filter", "abc"],
     "--local-ranks-filter abc: give local ranks separated by commas (for example 0,1)"),
    (["--log-dir", "{file}"], "--log-dir {file} is no directory that can be written (Not a directory); give one"),
])
def test_the_launcher_refuses_a_torchrun_value_it_would_fail_on_in_one_line_before_the_config(launcher, message,
                                                                                               tmp_path, capsys):
    file = tmp_path / "file"
    file.touch()
    launcher = [argument.format(file=file) for argument in launcher]
    code, err = run_command("tools.launch", [*launcher, "-m", "bt_fast.train", "--config", "configs/demo_cpu.yaml"],
                            capsys)
    assert code == 2 and err == [f"error: {message.format(file=file)}"]


def test_the_launcher_takes_a_range_of_nodes_as_torchrun_does(image_folder, tmp_path, capsys, monkeypatch):
    from tools import launch
    monkeypatch.setattr(launch.torchrun, "run", lambda options: pytest.fail("torchrun started"))
    assert launch.main(["--nnodes", "1:4", "--nproc-per-node", "2", "--max-restarts", "0", "-m", "bt_fast.train",
                        *tiny_args(image_folder, tmp_path / "run"), "--check"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("gpus, message", [
    (0, "config key 'device' is cuda but no CUDA device is visible; use cpu"),
    (2, "local rank 2 has no GPU of its own (2 visible); start at most that many processes per node (GPUS=...)"),
])
def test_the_launcher_refuses_ranks_without_a_gpu_of_their_own_before_torchrun(gpus, message, image_folder, tmp_path,
                                                                               capsys, monkeypatch):
    """Each rank would fail to find its GPU, once per rank and restart."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    code, err = run_command("tools.launch", ["--nproc-per-node", "3", "-m", "bt_fast.train",
                                             *tiny_args(image_folder, tmp_path / "run", "device=cuda")], capsys)
    assert code == 2 and err == [f"error: {message}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("launcher, batch, message", [
    (["--nproc-per-node", "3"], 8, "config key 'batch_size' (8) must be divisible by the world size (3)"),
    (["--nnodes", "2", "--nproc-per-node", "2"], 6,
     "config key 'batch_size' (6) must be divisible by the world size (4)"),
    (["--nproc-per-node", "3"], 3, "config key 'batch_size' (3) gives 1 image per rank over 3 ranks; BatchNorm needs "
                                   "at least 2 per rank: use batch_size >= 6"),
])
def test_the_launcher_refuses_a_batch_the_ranks_cannot_split_before_torchrun(launcher, batch, message, image_folder,
                                                                           tmp_path, capsys, monkeypatch):
    """Each rank refused it, once per torchrun restart: 12 lines for 3 ranks and 3 restarts."""
    from tools import launch
    monkeypatch.setattr(launch.torchrun, "run", lambda options: pytest.fail("torchrun started"))
    code, err = run_command("tools.launch", [*launcher, "-m", "bt_fast.train",
                                             *tiny_args(image_folder, tmp_path / "run", f"batch_size={batch}")], capsys)
    assert code == 2 and err == [f"error: {message}"]
    assert not (tmp_path / "run").exists()


def test_the_launcher_reads_the_training_options_as_bt_fast_train_does(image_folder, tmp_path, capsys, monkeypatch):
    """`make pretrain GPUS=2 ARGS=...` passes ARGS through the launcher: --check checks once and starts no rank,
    --help is bt_fast.train's, a bad option is one line."""
    from tools import launch
    monkeypatch.setattr(launch.torchrun, "run", lambda options: pytest.fail("torchrun started"))
    train = ["--nproc-per-node", "2", "-m", "bt_fast.train"]
    args = tiny_args(image_folder, tmp_path / "run")
    assert launch.main([*train, *args[2:], "--check", *args[:2], "seed=3"]) == 0
    assert capsys.readouterr().err == "" and list(tmp_path.iterdir()) == []
    code, err = run_command("tools.launch", [*train, *args, "--no-such-option"], capsys)
    assert code == 2 and err == ["error: unrecognized arguments: --no-such-option (see --help)"]
    with pytest.raises(SystemExit) as exit_info:
        launch.main([*train, *args, "--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and help_text.startswith("usage: python -m bt_fast.train ")
    assert "\n  epochs = 1000\n" in help_text


@pytest.mark.parametrize("argv, message", [
    (["--train-per-class", "-1"], "--train-per-class must be at least 1, got -1"),
    (["--val-per-class", "0"], "--val-per-class must be at least 1, got 0"),
    (["--classes", "3"], "--classes and --workers are for --imagenet-like only"),
    (["--imagenet-like", "10", "X", "--train-per-class", "2"],
     "--train-per-class and --val-per-class are for the demo set only"),
    (["--imagenet-like", "10", "X", "--classes", "0"], "--classes must be at least 1, got 0"),
    # (in the library's names: "needs count >= 1 and num_classes >= 1")
    (["--imagenet-like", "0", "X"], "--imagenet-like N DIR: N must be a number of images, at least 1, got '0'"),
])
def test_make_demo_data_refuses_counts_it_would_ignore_or_misuse(argv, message, tmp_path, capsys):
    root = str(tmp_path / "demo")
    argv = [root if a == "X" else a for a in argv] if "X" in argv else [*argv, root]
    code, err = run_command("tools.make_demo_data", argv, capsys)
    assert code == 2 and err == [f"error: {message} (see --help)"]
    assert list(tmp_path.iterdir()) == []


def test_a_folder_of_images_without_class_folders_fails_the_check_as_it_fails_the_run(tmp_path, capsys):
    """`--check` (and so the launcher) passed it; the run then stopped at its first listing."""
    loose = tmp_path / "photos"
    write_image_folder(loose, classes=1, per_class=2)
    for image in (loose / "class0").iterdir():
        image.rename(loose / image.name)
    (loose / "class0").rmdir()
    message = (f"error: data directory {loose} holds no images in class sub-directories (expected "
               f"{loose}/<class>/<image>.jpg)")
    for check in (["--check"], []):
        code, err = run_command("bt_fast.train", [*tiny_args(loose, tmp_path / "run"), *check], capsys)
        assert code == 2 and err == [message]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_the_check_refuses_what_the_run_refuses_and_says_when_it_passes(image_folder, tmp_path, capsys):
    """`--check` exited 0, without a word, where the run then stopped: at once (a step too large for this machine's
    memory; a resolution schedule FFCV's host crop cannot follow, now refused before the .beton is converted, too),
    or as it built the k-NN monitor (a validation class the training folder lacks), the pipeline (a .beton the
    first-use conversion cannot write, or a directory; a .beton padded above ffcv.max_padded_side; data= a file for
    a pipeline listing an ImageFolder) or the augmentation (Triton on the CPU, refused only after the first-use
    conversion). Where it passes, it says so. With no data= (a missing or directory ffcv.beton), a list file data= that
    the first-use conversion cannot read, or a k-NN folder without class folders, the check passed and the ffcv run
    refused only after converting for as long as it takes (the launcher's check passed it too)."""
    from pipelines.convert import convert
    inputs = tmp_path / "inputs"
    val = write_image_folder(inputs / "val", classes=4, per_class=1)
    blocker = inputs / "a_file"
    blocker.write_text("")
    listing = inputs / "list.txt"
    listing.write_text('{"images": 1}\n')
    loose = write_image_folder(inputs / "loose", classes=1, per_class=1)
    for image in (loose / "class0").iterdir():
        image.rename(loose / image.name)
    (loose / "class0").rmdir()
    beton = inputs / "small.beton"
    convert(image_folder, beton, "ffcv", max_resolution=64, workers=1)
    cases = [(["arch=resnet50", "projector=8192-8192-8192", "batch_size=1048576"],
              "error: config keys 'augment.image_size' (32) and 'batch_size' (1048576) need "),
             (["pipeline=ffcv", "ffcv.crop=host", "augment.start_image_size=16"],
              "error: config key 'augment.start_image_size' (16) sets a resolution schedule, but FFCV's host crop has "
              "one output size, fixed when FFCV compiles its loader; set ffcv.crop=device to crop on the device"),
             (["knn_every=1", f"knn_val={val}"], f"error: {val} has classes not in the training folder: class3; train "
                                                  f"and val must use the same class sub-directories"),
             (["pipeline=ffcv", f"ffcv.beton={blocker}/data.beton"],
              f"error: cannot write the FFCV dataset {blocker}/data.beton (Not a directory): convert it elsewhere with "
              f"`python -m tools.convert {image_folder} DST.beton --format ffcv` and pass ffcv.beton=DST.beton"),
             (["pipeline=ffcv", f"ffcv.beton={val}"], f"error: FFCV dataset {val} is a directory, not a .beton file; "
                                                     f"point ffcv.beton at a .beton file (written there from data= on "
                                                     f"first use)"),
             (["pipeline=ffcv", "data=", f"ffcv.beton={val}"], f"error: FFCV dataset {val} is a directory, not a "
                                                              f".beton file"),
             (["pipeline=ffcv", "data=", f"ffcv.beton={inputs}/typo.beton"],
              f"error: FFCV dataset {inputs}/typo.beton does not exist; fix ffcv.beton or pass data=<ImageFolder> to "
              f"convert it"),
             (["pipeline=ffcv", f"data={listing}"], f"error: {listing} line 1: label '1}}' is not an integer"),
             (["pipeline=ffcv", "knn_every=1", f"knn_val={loose}"], f"error: config key 'knn_val': data directory {loose} "
                                                                    f"holds no images in class sub-directories"),
             (["pipeline=ffcv", f"data={beton}", "knn_every=1", f"knn_val={val}"],
              f"error: config key 'knn_val' needs knn_train=<a labelled ImageFolder> here: the k-NN monitor's memory "
              f"bank is data= by default, and data= names {beton}, not an ImageFolder"),
             (["pipeline=ffcv", f"ffcv.beton={beton}", "ffcv.crop=device", "ffcv.max_padded_side=32"],
              f"error: FFCV dataset {beton} pads every image to 48x64 (its largest height and width), above the cap of "
              f"32 px; reconvert it with `python -m tools.convert SRC {beton} --format ffcv --max-resolution 32 "
              f"--force`"),
             ([f"data={blocker}"], f"error: data {blocker} is a file; give the ImageFolder directory (or, with "
                                   f"pipeline=ffcv, a .beton)"),
             (["augment.backend=triton"], "error: config key 'augment.backend': triton runs on CUDA, and the images "
                                          "are on cpu (on the CPU it needs TRITON_INTERPRET=1 set before start, "
                                          "slow); use augment.backend=auto or eager")]
    for extra, message in cases:
        for check in (["--check"], []):
            code, err = run_command("bt_fast.train", [*tiny_args(image_folder, tmp_path / "run", *extra), *check],
                                    capsys)
            assert code == 2 and len(err) == 1 and err[0].startswith(message), (extra, check, err)
    assert run_main(capsys, "--check", *tiny_args(image_folder, tmp_path / "run"))[:2] == (0, (
        f"check passed: nothing stops this run before its first step; pipeline reference, data {image_folder}, "
        f"out_dir {tmp_path / 'run'}; nothing was created\n"))
    assert [p.name for p in tmp_path.iterdir()] == ["inputs"] and not list(image_folder.parent.glob("*.beton"))
    assert sorted(p.name for p in inputs.glob("*.beton*")) == ["small.beton", "small.beton.report.json"]


def test_an_empty_image_folder_for_a_first_use_conversion_is_only_its_error(tmp_path, capsys):
    # The conversion was announced ("converting ... (first use)") before the listing found no images.
    empty = tmp_path / "train"
    (empty / "some_class").mkdir(parents=True)
    code, err = run_command("bt_fast.train", tiny_args(empty, tmp_path / "run", "pipeline=ffcv"), capsys)
    assert code == 2 and err == [f"error: data directory {empty} holds no images in class sub-directories "
                                 f"(expected {empty}/<class>/<image>.jpg)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # no .beton, report, lock or out_dir
    assert [p.name for p in empty.iterdir()] == ["some_class"]


@pytest.mark.parametrize("mode, flag, value, shown", [
    ("knn", "--temperature", "nan", "nan"), ("knn", "--temperature", "inf", "inf"),
    ("linear", "--lr", "nan", "nan"), ("linear", "--lr", "1e400", "inf"), ("linear", "--weight-decay", "nan", "nan"),
    ("finetune", "--lr-backbone", "inf", "inf"), ("finetune", "--lr-classifier", "nan", "nan"),
])
def test_evaluate_refuses_a_rate_that_is_not_a_finite_number(mode, flag, value, shown, tmp_path, capsys):
    # nan passed `<= 0` and evaluated on, printing an accuracy (T=nan: 8.59% top-1) as if it were a result.
    argv = ["--random-init", "--arch", "resnet18", "--data", str(tmp_path / "missing"), "--workers", "0"]
    code, err = run_command("tools.evaluate", [*argv, "--mode", mode, flag, value], capsys)
    assert code == 2 and err == [f"error: {flag} must be a finite number, got {shown} (see --help)"]


@pytest.mark.parametrize("module", ["tools.evaluate", "tools.dali_semantics"])
@pytest.mark.parametrize("seed", ["-1", str(2**32), str(10**20)])
def test_evaluate_and_dali_semantics_refuse_a_seed_beyond_32_bits(module, seed, tmp_path, capsys):
    # -1 ended dali_semantics in numpy's "expected non-negative integer" traceback, 10**20 the linear probe
    # in torch.manual_seed's "Overflow when unpacking long long"; the config's seed takes 0..2**32-1.
    argv = (["--random-init", "--arch", "resnet18", "--mode", "linear", "--data", str(tmp_path / "missing")]
            if module == "tools.evaluate" else ["--data", str(tmp_path / "missing")])
    code, err = run_command(module, [*argv, "--seed", seed], capsys)
    assert code == 2 and err == [f"error: --seed must lie in 0..4294967295 (32 bits), got {seed} (see --help)"]


@pytest.mark.parametrize("override, message", [
    ("epochs=[1", "config key 'epochs' expects a number, got '[1'"),
    ("augment.crop_scale=[0.1,", "config key 'augment.crop_scale' expects a list of 2 numbers, got '[0.1,'"),
    ("tensorboard={", "config key 'tensorboard' expects true/false (or 1/0), got '{'"),
    ("seed=!!python/object:os.system", "config key 'seed' expects a number, got '!!python/object:os.system'"),
])
def test_an_override_that_is_no_yaml_value_is_refused_by_its_key(override, message):
    # These ended in PyYAML's ScannerError / ParserError / ConstructorError traceback.
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert str(err.value) == message


def test_a_config_section_with_every_line_commented_out_changes_nothing_and_a_value_for_it_is_refused(tmp_path):
    # "config key 'augment' is a section; give 'augment.<field>=...'": command-line advice for a file's section
    path = tmp_path / "config.yaml"
    path.write_text("epochs: 3\naugment:\n#  image_size: 64\n")
    assert load_config(path).augment == load_config().augment and load_config(path).epochs == 3
    path.write_text("augment: 64\n")
    with pytest.raises(ConfigError, match=r"^config key 'augment' is a section; give 'augment\.<field>=\.\.\.'$"):
        load_config(path)


@pytest.mark.parametrize("module", ["bt_fast.train", "tools.preview"])
def test_an_empty_config_file_name_is_refused_not_read_as_the_defaults(module, capsys):
    """`--config "$CONFIG"` with CONFIG unset trained the paper's recipe (ResNet-50, batch 2048, 1000 epochs)."""
    code, err = run_command(module, ["--config", "", "--check"] if module == "bt_fast.train" else ["--config", " "],
                            capsys)
    assert code == 2 and err == ["error: the config file's name is empty (an unset shell variable?); give a YAML "
                                 "file (see configs/), or no --config for the defaults"]


@pytest.mark.parametrize("text", ["lr_weights: true\n", "lr_weights: yes\n"])
def test_a_flag_where_a_number_goes_is_refused_as_no_number(text, tmp_path):
    # "has an unsupported value True" named no type to give, and YAML's True stood for what was written.
    assert config_file_error(text, tmp_path)[1] == f"config key 'lr_weights' expects a number, got {text[12:-1]!r}"
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"lr_weights={text[12:-1]}"])
    assert str(err.value) == f"config key 'lr_weights' expects a number, got {text[12:-1]!r}"


def test_a_config_files_text_values_keep_their_text_and_its_numbers_read_as_yaml_reads_them(tmp_path):
    """YAML 1.1 reads `010` as 8, `2024_06_01` as 20240601, `12:30` as 750 (base 60) and `yes` as True: a run
    with `out_dir: 010` in its config file wrote into a folder named 8. The command line kept these as text;
    the file now does too, and keys that take numbers or flags read the same values as before."""
    path = tmp_path / "config.yaml"
    path.write_text("out_dir: 010\ndata: 2024_06_01\nknn_val: 12:30\nknn_train: yes\nepochs: 010\n"
                    "batch_size: 1_6\ncompile_model: yes\naugment:\n  crop_scale: [0.5, 1]\n  hue: .1\n")
    config = load_config(path)
    assert (config.out_dir, config.data, config.knn_val, config.knn_train) == ("010", "2024_06_01", "12:30", "yes")
    assert yaml.safe_load(path.read_text())["epochs"] == 8  # the reading every number keeps
    assert (config.epochs, config.batch_size, config.compile_model) == (8, 16, True)
    assert (config.augment.crop_scale, config.augment.hue) == ((0.5, 1.0), 0.1)
    assert load_config(path, ["out_dir=010"]).out_dir == load_config(path).out_dir


@pytest.mark.parametrize("text, key", [("1: 2\n", "1"), ("augment:\n  224: 48\n", "augment.224"),
                                       ("yes: 1\n", "yes")])
def test_a_config_file_key_that_is_not_text_is_an_unknown_key(text, key, tmp_path):
    # A number or boolean as key ended in difflib's "TypeError: 'int' object is not iterable" traceback; the
    # key is named as written (YAML 1.1 reads `yes` as True).
    assert config_file_error(text, tmp_path)[1] == f"unknown config key '{key}'"


@pytest.mark.parametrize("text, problem", [
    ("workers: 2\nepochs:\t4\n", "while scanning for the next token, found character '\\t' that cannot start any "
                                  "token (line 2, column 8)"),
    ("augment:\n  crop_scale: [0.2, 1.0\n", "while parsing a flow sequence, expected ',' or ']', but got "
                                           "'<stream end>' (line 3, column 1)"),
    ("epochs: 4\n---\nepochs: 5\n", "expected a single document in the stream, but found another document "
                                    "(line 2, column 1)"),
])
def test_a_config_file_that_is_not_yaml_names_the_problem_and_its_line(text, problem, tmp_path):
    # Only the first line of PyYAML's message came out ("while scanning for the next token"), not what is
    # wrong nor where.
    path, error = config_file_error(text, tmp_path)
    assert error == f"config file {path} is not valid YAML: {problem}"


@pytest.mark.parametrize("text, key, value", [("out_dir: [runs, demo]\n", "out_dir", ['runs', 'demo']),
                                              ("data: {train: /data}\n", "data", {'train': '/data'}),
                                              ("ffcv:\n  beton: [a.beton, b.beton]\n", "ffcv.beton",
                                               ['a.beton', 'b.beton'])])
def test_a_list_or_mapping_for_a_text_key_is_refused(text, key, value, tmp_path):
    # It became the text of the list: out_dir "['runs', 'demo']", a directory created under that name.
    assert config_file_error(text, tmp_path)[1] == f"config key '{key}' expects text (one path or name), got {value!r}"


@pytest.mark.parametrize("override, message", [
    ("arch=resnet99", "config key 'arch' must be one of resnet18, resnet50, got 'resnet99' (did you mean 'resnet50'?)"),
    ("pipeline=ffvc", "config key 'pipeline' must be one of reference, ffcv, dali, got 'ffvc' (did you mean 'ffcv'?)"),
])
def test_the_run_check_refuses_an_arch_or_pipeline_that_does_not_exist(override, message, image_folder, tmp_path,
                                                                        capsys):
    # `--check`, what tools.launch runs once before torchrun, passed them: every rank then failed, once per restart.
    argv = ["--check", f"data={image_folder}", f"out_dir={tmp_path / 'run'}", override]
    code, err = run_command("bt_fast.train", argv, capsys)
    assert code == 2 and err == [f"error: {message}"]
    assert not (tmp_path / "run").exists()


def test_the_run_check_refuses_dali_records_that_hold_no_dataset(tmp_path, capsys):
    # `--check` passed a dali.records typo (data need not be given then): every rank met it, once per restart.
    records = tmp_path / "shards"
    argv = ["--check", "pipeline=dali", f"dali.records={records}", f"out_dir={tmp_path / 'run'}",
            "device=cpu", "arch=resnet18", "projector=64-64", "batch_size=8"]  # (the paper's step outgrows this CPU)
    code, err = run_command("bt_fast.train", argv, capsys)
    assert code == 2 and err == [f"error: config key 'dali.records' names {records}, which holds no dataset.json; "
                                 f"write the records with `python -m tools.convert SRC {records} --format dali` or "
                                 f"leave it empty"]
    records.mkdir()
    (records / "dataset.json").write_text("{}")
    from bt_fast.train import main
    main(argv)  # passes: the check reads no further than the file's presence
    # data= may name the records themselves, as the pipeline reads them (`pipelines.dali_format.names_records`): the
    # check refused them as an ImageFolder without class folders.
    main([arg for arg in argv if not arg.startswith("dali.records=")] + [f"data={records}"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["epochs", "lambd", "augment.crop_ratio"])
def test_an_integer_beyond_a_floats_range_is_refused_like_inf(key):
    # float(10**400) raised OverflowError through load_config: a traceback, where 1e400 (inf) is one line.
    huge = "1" + "0" * 400
    value = f"[1, {huge}]" if key == "augment.crop_ratio" else huge
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{key}={value}"])
    assert str(err.value) == (f"config key '{key}' must be a finite number, got an integer beyond a float's range "
                              f"(about 1.8e308)")


def test_make_pretrain_takes_the_config_as_config_not_as_a_second_config_option(tmp_path):
    """run_pretrain.sh passes CONFIG (default: the demo's) as --config; one in ARGS was a second one, which won."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "run")}
    from tests.conftest import REPO
    result = subprocess.run(["bash", "run_pretrain.sh", "--config=configs/paper_rn50.yaml"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: give the config file as CONFIG=FILE (make pretrain CONFIG=...), not --config in the arguments"]
    assert not (tmp_path / "run").exists()


def make_eval(tmp_path, *settings: str, home=None):
    """`make eval` with `settings`, its checkpoint in an empty tmp_path/run (and HOME `home`, if given): (exit code,
    stderr lines)."""
    import shutil
    import subprocess
    import sys
    from tests.conftest import REPO
    if shutil.which("make") is None:
        pytest.skip("no make")
    # STAMP= : no venv to install; a clean environment: no MAKEFLAGS of a `make test` above, no ARGS from it
    result = subprocess.run(["make", "eval", "STAMP=", f"PY={sys.executable}", f"OUT={tmp_path / 'run'}",
                             f"DATA={tmp_path / 'data'}", *settings], cwd=REPO,
                            env={"PATH": os.environ["PATH"], **({"HOME": str(home)} if home else {})},
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stderr.splitlines()


@pytest.mark.parametrize("args, message", [
    ("--k 5", "the linear probe refuses --k in ARGS, which go to both runs: give the k-NN run's own options in "
              "KNN_ARGS= instead"),
    ("--device cpu --temperature=0.1 --k 3", "the linear probe refuses --k --temperature in ARGS, which go to both "
                                             "runs: give the k-NN run's own options in KNN_ARGS= instead"),
    ("--epochs 2", "the k-NN run refuses --epochs in ARGS, which go to both runs: give the linear probe's own "
                   "options in LINEAR_ARGS= instead"),
    ("--no-cache-features", "the k-NN run refuses --no-cache-features in ARGS, which go to both runs: give the "
                            "linear probe's own options in LINEAR_ARGS= instead"),
    ("", "{run}/checkpoint.pth does not exist: nothing trained there yet; run make pretrain first (with the same "
         "CONFIG= and OUT=)"),
])
def test_make_eval_refuses_what_would_fail_before_it_runs_anything(args, message, tmp_path):
    """ARGS go to both runs: --k ran the whole k-NN evaluation, then the linear probe refused it. With no trained
    run, tools.evaluate's line said to pass --checkpoint, which make eval gives itself."""
    code, err = make_eval(tmp_path, f"ARGS={args}")
    assert code == 2 and err[0] == f"error: {message.format(run=tmp_path / 'run')}", err
    assert len(err) == 2 and err[1].startswith("make: *** "), err  # make's own line, and nothing ran


def test_make_eval_refuses_a_data_folder_without_train_and_val_in_makes_terms(tmp_path):
    """tools.evaluate's own line said to pass --data TRAIN --val-data VAL, options make eval gives itself."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pth").write_bytes(b"")  # refused before it is read
    (tmp_path / "data" / "class0").mkdir(parents=True)  # a training folder
    code, err = make_eval(tmp_path)
    assert code == 2 and err[0] == (f"error: DATA={tmp_path / 'data'} holds no train/ and val/ folders; give DATA= the "
                                    f"folder that holds both (the demo's is data/demo), or a training folder with "
                                    f"ARGS=\"--val-data VAL\""), err
    assert len(err) == 2 and err[1].startswith("make: *** "), err
    code, err = make_eval(tmp_path, f"DATA={tmp_path / 'typo'}")  # not said to hold no train/ and val/: absent
    assert code == 2 and err[0] == (f"error: DATA={tmp_path / 'typo'} does not exist; give DATA= the folder that holds "
                                    f"train/ and val/ (the demo's is data/demo)"), err


@pytest.mark.parametrize("setting, message", [
    ("LINEAR_ARGS=--k 5", "--k applies to --mode knn only, not --mode linear (see --help)"),
    ("EVAL_JSON={tmp}/e.json", "argument --json: cannot write {tmp}/e.linear.json (Is a directory); give a file path "
                               "in a writable directory (see --help)"),
])
def test_make_eval_checks_the_linear_probes_arguments_before_the_knn_run(setting, message, tmp_path):
    """Both were refused by the linear probe only after the whole k-NN evaluation. Here the k-NN run would have
    failed on the empty checkpoint: the line is the argument check's."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pth").write_bytes(b"")
    for folder in ("data/train", "data/val", "e.linear.json"):
        (tmp_path / folder).mkdir(parents=True)
    code, err = make_eval(tmp_path, setting.format(tmp=tmp_path))
    assert code == 2 and err[0] == f"error: {message.format(tmp=tmp_path)}", err
    assert len(err) == 2 and err[1].startswith("make: *** "), err


def test_make_evals_options_of_one_run_are_those_tools_evaluate_refuses_in_the_other():
    import re
    from tests.conftest import REPO
    from tools.evaluate import READ_BY
    makefile = (REPO / "Makefile").read_text()
    listed = {name: set(re.search(rf"^{name}\s*:=(.*)$", makefile, re.M).group(1).split())
              for name in ("KNN_ONLY", "LINEAR_ONLY")}
    only = {run: {f"--{name.replace('_', '-')}" for name, modes in READ_BY.items()
                  if run in modes and other not in modes} for run, other in (("knn", "linear"), ("linear", "knn"))}
    assert listed == {"KNN_ONLY": only["knn"], "LINEAR_ONLY": only["linear"] | {"--no-cache-features"}}



def test_preview_refuses_a_key_given_twice_as_the_training_command_does(capsys):
    # It rendered the last one given: `--pipeline reference pipeline=dali` showed DALI's views.
    code, err = run_command("tools.preview", ["--pipeline", "reference", "pipeline=dali"], capsys)
    assert code == 2 and err == ["error: config key 'pipeline' is given twice (pipeline=reference, pipeline=dali); "
                                 "give each key once"]


def test_make_eval_refuses_json_in_args_which_the_linear_probe_would_overwrite(tmp_path):
    code, err = make_eval(tmp_path, f"ARGS=--json {tmp_path / 'e.json'}")
    assert code == 2 and err[0] == ("error: --json in ARGS, which go to both runs, would hold the linear probe's "
                                    "result in place of the k-NN run's: give EVAL_JSON=out.json (the k-NN result "
                                    "there, the linear probe's in out.linear.json)"), err


def test_the_benchs_plot_is_a_png_refused_otherwise_before_it_measures(capsys):
    # A .txt plot failed in matplotlib after the whole benchmark; with no suffix it was written as NAME.png.
    code, err = run_command("tools.bench.__main__", ["--plot", "bench.txt"], capsys)
    assert code == 2 and err == ["error: argument --plot: bench.txt does not end in .png; the image is written as PNG "
                                 "only, so give a .png file (see --help)"]


def test_the_bench_refuses_a_split_datasets_root_before_it_measures(tmp_path, capsys):
    # The reference loader measured train and val as two classes; the FFCV loaders were each "unavailable".
    for split in ("train", "val"):
        write_image_folder(tmp_path / "set" / split, classes=1, per_class=1)
    code, err = run_command("tools.bench.__main__", ["--data", str(tmp_path / "set")], capsys)
    assert code == 2 and err == [f"error: --data {tmp_path / 'set'} holds train/ and val/: the loaders would read both "
                                 f"splits as two classes; give --data {tmp_path / 'set' / 'train'}"]
