"""bt_fast: high-throughput Barlow Twins pretraining."""
