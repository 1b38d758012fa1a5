"""Benchmarks around the app: each entry point is a module run from the project root with `python -m`.

- `python -m bench.compare`: methods x imbalance factors x seeds, one real run per cell; the paper's
  Table 2 and Figure 4 (`--quick`: the CI grid).
- `python -m bench.default_run`: wall time, peak memory and accuracy of the offline default run (`make run`).
- `python -m bench.sim_overhead`: Flower's simulation against a plain PyTorch FedAvg loop (`make bench`).
- `python -m bench.align_cost`: what stage 3 costs, in parts and as a share of a round.
- `python -m bench.paper_cost`: a few rounds of the CIFAR-10-LT preset, measured, and the paper's grid projected.
- `python -m bench.scale`: start-up, round time and memory at 100 and 1,000 virtual clients.
- `python -m bench.pretrain_step`: one DWP step's time and memory, alpha < 1 against alpha = 1.
- `python -m bench.table4`: the paper's Table 4, few-shot training from the pretrained g_fl against scratch.
- `bash bench/gpu_check.sh OUT_DIR`: the checks that need a CUDA GPU.

Shared parts: `bench.runs` launches one real run and finds its folders (read them with
`flcore.reports.read_metrics` / `read_summary`); `bench.limits` holds the arithmetic limits of a device.
Measured results, with their commands: bench/results/README.md.
"""
