"""Training throughput: compute ceiling, plain-PyTorch reference, end-to-end through Ray, peak RSS.

    .venv/bin/python bench/throughput.py                       # everything, 1M rows
    .venv/bin/python bench/throughput.py --only ceiling        # in-memory parts only

The workload: ESMM, 20 sparse features of vocabulary 100,000 and dim 16, towers
256-128-64 (CTR and CVR), batch 2048, ids uniform over the vocabulary unless `--zipf A`.

1. ceiling    rows/s of the training step (DMP, world size 1, fused row-wise Adagrad, Adam for
              dense) over batches already converted to KeyedJaggedTensor in memory (no I/O);
2. reference  the same model in plain PyTorch: 20 nn.EmbeddingBag(sparse=True) + Adagrad,
              towers with Adam, same batches;
3. end-to-end `mtrec train` (Ray Data -> Ray Train -> DMP) over the same rows from Parquet, world
              size 1 and 2: rows/s while streaming (first batch to last, every worker) and the
              job's wall time including Ray start/stop;
   With `--shuffle-cost`, each world size also runs with rows in file order (`train.shuffle`
   off) and the ratio of the two is printed;
4. rss        peak memory of the job's processes together (PSS summed, so the shared object
              store counts once; sampled every 2 s) for a day of `--rows` and of 4 x `--rows`.

`--workload sequence` times, in memory only, the same 20 tables plus one behaviour sequence per row:
`hist_item_id`, `hist_f02`, `hist_f03` (list<int64>, 50 behaviours, or lengths drawn from
`--hist-min`..50) looked up in the tables of `item_id`, `f02`, `f03` and mean-pooled: mtrec's DMP
step on BatchConverter batches vs the same model in plain PyTorch (nn.Embedding(sparse=True) read
through F.embedding_bag, Adagrad + Adam), alternating run by run. `--bags` adds mtrec with the
history declared as multi-hot mean bags on the same tables (the bag collection's pooled kernels).
It prints the CPU pressure of the runs (the machine is shared) and ends with
`sequence rows/s mtrec/plain: X`.

    .venv/bin/python bench/throughput.py --workload sequence --zipf 1.2 --bags

The machine is noisy: compare figures from one run. Figures and the command: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from torch import nn

N_SPARSE, VOCAB, DIM, TOWER, BATCH = 20, 100_000, 16, [256, 128, 64], 2048
DAY = "2026-01-01"


def bench_config(logs: str, workdir: str, workers: int = 1, torch_threads: int = 0, shuffle: bool = True) -> dict:
    """The ESMM workload above as an mtrec config (f00 is user_id, f01 item_id); `shuffle`: the
    default `train.shuffle`, else rows in file order."""
    names = ["user_id", "item_id"] + [f"f{i:02d}" for i in range(2, N_SPARSE)]
    return {
        "name": "esmm_bench",
        "labels": {"click": "binary", "conversion": "binary"},
        "features": {"sparse": [{"name": n, "hash_size": VOCAB, "dim": DIM} for n in names]},
        "tasks": [
            {"name": "ctr", "label": "click"},
            {"name": "cvr", "label": "conversion", "given": "ctr", "joint": "ctcvr"},
        ],
        "model": {"arch": "esmm", "tower": TOWER},
        "train": {
            "batch_size": BATCH,
            "num_workers": workers,
            "sharding_types": ["table_wise"],
            "torch_threads": torch_threads,
            "embedding_optimizer": {"name": "rowwise_adagrad", "lr": 0.05},
            "dense_optimizer": {"name": "adam", "lr": 0.001},
            **({} if shuffle else {"shuffle": {"buffer_rows": 0, "files": False}}),
        },
        "job": {"logs": logs, "workdir": workdir},
    }


def _draw_ids(rng: np.random.Generator, n: int, zipf: float | None) -> np.ndarray:
    """n ids uniform over the vocabulary, or Zipf(`zipf`) folded into it (id 0 the most frequent)."""
    ids = (rng.zipf(zipf, n) - 1) % VOCAB if zipf else rng.integers(0, VOCAB, n)
    return ids.astype(np.int64)


def make_rows(n: int, seed: int, zipf: float | None) -> pa.Table:
    """n impressions with the bench's columns; ids uniform (or Zipf) over the vocabulary."""
    rng = np.random.default_rng(seed)
    cols = {}
    for i in range(N_SPARSE):
        name = ["user_id", "item_id"][i] if i < 2 else f"f{i:02d}"
        cols[name] = pa.array(_draw_ids(rng, n, zipf))
    click = (rng.random(n) < 0.05).astype(np.int8)
    cols["position"] = pa.array(rng.integers(0, 10, n).astype(np.int32))
    cols["click"] = pa.array(click)
    cols["conversion"] = pa.array((click & (rng.random(n) < 0.1)).astype(np.int8))
    return pa.table(cols)


def write_day(root: Path, rows: int, seed: int, zipf: float | None, files: int = 8) -> None:
    d = root / f"dt={DAY}"
    d.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for k in range(files):
        n = min(per, rows - k * per)
        if n > 0:
            pq.write_table(make_rows(n, seed * 1000 + k, zipf), d / f"part-{k:05d}.parquet")


def _rows_per_s(step, batches: list, warmup: int) -> float:
    """Rows/s of `step` over every batch, after `warmup` untimed steps."""
    for b in batches[:warmup]:
        step(b)
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    return len(batches) * BATCH / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# 1. compute ceiling (mtrec's DMP training step, batches in memory)


def ceiling(cfg, table: pa.Table, warmup: int) -> float:
    from mtrec.data.batch import BatchConverter
    from mtrec.train.local import build_sharded

    conv = BatchConverter(cfg.spec)
    batches = [conv(table.slice(i, BATCH)) for i in range(0, table.num_rows - BATCH + 1, BATCH)]
    dmp, opt = build_sharded(cfg)
    dmp.train()

    def step(b):
        opt.zero_grad()
        loss, _ = dmp(b)
        loss.backward()
        opt.step()

    return _rows_per_s(step, batches, warmup)


# ------------------------------------------------------------------------------------------------
# 2. plain-PyTorch reference: nn.EmbeddingBag(sparse=True) + Adagrad, towers with Adam


class PlainESMM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tables = nn.ModuleList(nn.EmbeddingBag(VOCAB, DIM, mode="sum", sparse=True) for _ in range(N_SPARSE))

        def tower():
            layers, d = [], N_SPARSE * DIM
            for h in TOWER:
                layers += [nn.Linear(d, h), nn.ReLU()]
                d = h
            return nn.Sequential(*layers, nn.Linear(d, 1))

        self.ctr, self.cvr = tower(), tower()

    def forward(self, ids: list[torch.Tensor], offsets: torch.Tensor):
        x = torch.cat([t(i, offsets) for t, i in zip(self.tables, ids, strict=True)], dim=1)  # B x 320
        return self.ctr(x).squeeze(1), self.cvr(x).squeeze(1)


def _esmm_loss(ctr_logit, cvr_logit, click, conv):
    """mtrec's ESMM loss: BCE(click, pCTR) + BCE(click AND conversion, pCTCVR)."""
    p_ctr = torch.sigmoid(ctr_logit)
    return nn.functional.binary_cross_entropy_with_logits(ctr_logit, click) + nn.functional.binary_cross_entropy(
        (p_ctr * torch.sigmoid(cvr_logit)).clamp(1e-7, 1 - 1e-7), click * conv
    )


def reference(table: pa.Table, warmup: int) -> float:
    from mtrec.data.kinds import hash_ids

    torch.manual_seed(0)
    names = table.column_names[:N_SPARSE]
    batches = []
    for i in range(0, table.num_rows - BATCH + 1, BATCH):
        t = table.slice(i, BATCH)
        ids = [torch.from_numpy(hash_ids(t.column(n).to_numpy(), VOCAB)) for n in names]
        batches.append(
            (
                ids,
                torch.arange(BATCH),
                torch.from_numpy(t.column("click").to_numpy().astype(np.float32)),
                torch.from_numpy(t.column("conversion").to_numpy().astype(np.float32)),
            )
        )
    model = PlainESMM()
    sparse_opt = torch.optim.Adagrad(list(model.tables.parameters()), lr=0.05)
    dense_opt = torch.optim.Adam(list(model.ctr.parameters()) + list(model.cvr.parameters()), lr=0.001)

    def step(b):
        ids, offsets, click, conv = b
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        _esmm_loss(*model(ids, offsets), click, conv).backward()
        sparse_opt.step()
        dense_opt.step()

    return _rows_per_s(step, batches, warmup)


# ------------------------------------------------------------------------------------------------
# The sequence workload: the same 20 tables, plus one behaviour sequence of up to SEQ_LEN behaviours
# whose columns share the candidate's tables (hist_item_id -> item_id, ...), mean-pooled (masked).

SEQ_LEN = 50
SEQ_TABLES = ["item_id", "f02", "f03"]  # hist_<t> is looked up in table <t>


def seq_config(logs: str, workdir: str) -> dict:
    """The issue 9 config plus the sequence group `hist`: one list column per shared table."""
    cfg = bench_config(logs, workdir)
    cfg["name"] = "esmm_seq_bench"
    cfg["features"]["sequences"] = [
        {
            "name": "hist",
            "max_len": SEQ_LEN,
            "order": "newest_last",
            "pooling": "mean",
            "features": [{"name": f"hist_{t}", "table": t} for t in SEQ_TABLES],
        }
    ]
    return cfg


def bags_config(logs: str, workdir: str) -> dict:
    """The sequence workload's model with the history declared as multi-hot mean bags on the shared
    tables instead of a sequence group: the same tables, towers and pooled vectors (in the same
    order), but every table sits in the bag collection and runs FBGEMM's pooled kernels. It
    measures what placing pooled-only sequence tables in the EmbeddingBagCollection would give."""
    cfg = bench_config(logs, workdir)
    cfg["name"] = "esmm_bags_bench"
    cfg["features"]["sparse"] += [
        {"name": f"hist_{t}", "table": t, "multi_hot": True, "pooling": "mean"} for t in SEQ_TABLES
    ]
    return cfg


def make_seq_rows(n: int, seed: int, zipf: float | None, min_len: int) -> pa.Table:
    """`make_rows` plus the history: per row a length drawn uniformly from min_len..SEQ_LEN (exactly
    SEQ_LEN when min_len is SEQ_LEN), and one list<int64> column per shared table, ids drawn like
    the candidate's."""
    table = make_rows(n, seed, zipf)
    rng = np.random.default_rng(seed + 10_000)
    lens = rng.integers(min_len, SEQ_LEN + 1, n)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    for t in SEQ_TABLES:
        ids = pa.array(_draw_ids(rng, int(lens.sum()), zipf))
        table = table.append_column(f"hist_{t}", pa.ListArray.from_arrays(offsets, ids))
    return table


class PlainSeqESMM(nn.Module):
    """The sequence workload in plain PyTorch: one nn.Embedding(sparse=True) per table, the towers
    of PlainESMM over the 20 candidate vectors and the pooled history (20 x 16 + 3 x 16 wide).

    A table the history shares is read once per step: one `F.embedding_bag` (sum) over the
    candidate's id (a bag of one, weight 1) and the row's history (one bag, weights 1/length, so
    the sum is the masked mean; an empty history is a zero vector). One sparse gradient per table,
    as in mtrec, where the candidate and the history read one weight too."""

    def __init__(self):
        super().__init__()
        names = ["user_id", "item_id"] + [f"f{i:02d}" for i in range(2, N_SPARSE)]
        self.shared = {names.index(t): k for k, t in enumerate(SEQ_TABLES)}  # table -> history column
        self.tables = nn.ModuleList(nn.Embedding(VOCAB, DIM, sparse=True) for _ in range(N_SPARSE))

        def tower():
            layers, d = [], (N_SPARSE + len(SEQ_TABLES)) * DIM
            for h in TOWER:
                layers += [nn.Linear(d, h), nn.ReLU()]
                d = h
            return nn.Sequential(*layers, nn.Linear(d, 1))

        self.ctr, self.cvr = tower(), tower()

    def forward(self, ids: list[torch.Tensor], hist: list[torch.Tensor], lengths: torch.Tensor):
        """ids: per table, B candidate ids; hist: per shared table, the N history ids of the batch
        (jagged, row after row); lengths: B history lengths."""
        b = lengths.numel()
        offsets = torch.cat([torch.arange(b), b + torch.cumsum(lengths, 0) - lengths])  # 2B bags
        weights = torch.cat([torch.ones(b), torch.repeat_interleave(1.0 / lengths.clamp(min=1), lengths)])
        cand, pooled = [], [None] * len(hist)
        for j, (table, i) in enumerate(zip(self.tables, ids, strict=True)):
            if j in self.shared:
                both = nn.functional.embedding_bag(
                    torch.cat([i, hist[self.shared[j]]]),
                    table.weight,
                    offsets,
                    mode="sum",
                    sparse=True,
                    per_sample_weights=weights,
                )  # 2B x D: the candidates, then the histories
                cand.append(both[:b])
                pooled[self.shared[j]] = both[b:]
            else:
                cand.append(table(i))
        x = torch.cat(cand + pooled, dim=1)  # B x (20 + 3) * 16, mtrec's order
        return self.ctr(x).squeeze(1), self.cvr(x).squeeze(1)


def seq_reference(table: pa.Table, warmup: int) -> float:
    """rows/s of PlainSeqESMM's training step (Adagrad on the sparse tables, Adam on the towers)."""
    from mtrec.data.kinds import hash_ids

    torch.manual_seed(0)
    names = table.column_names[:N_SPARSE]
    batches = []
    for i in range(0, table.num_rows - BATCH + 1, BATCH):
        t = table.slice(i, BATCH)
        ids = [torch.from_numpy(hash_ids(t.column(n).to_numpy(), VOCAB)) for n in names]
        cols = [t.column(f"hist_{s}").combine_chunks() for s in SEQ_TABLES]
        hist = [torch.from_numpy(hash_ids(c.flatten().to_numpy(), VOCAB)) for c in cols]
        lengths = torch.from_numpy(np.diff(cols[0].offsets.to_numpy()).astype(np.int64))
        click = torch.from_numpy(t.column("click").to_numpy().astype(np.float32))
        conv = torch.from_numpy(t.column("conversion").to_numpy().astype(np.float32))
        batches.append((ids, hist, lengths, click, conv))
    model = PlainSeqESMM()
    sparse_opt = torch.optim.Adagrad(list(model.tables.parameters()), lr=0.05)
    dense_opt = torch.optim.Adam(list(model.ctr.parameters()) + list(model.cvr.parameters()), lr=0.001)

    def step(b):
        ids, hist, lengths, click, conv = b
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        _esmm_loss(*model(ids, hist, lengths), click, conv).backward()
        sparse_opt.step()
        dense_opt.step()

    return _rows_per_s(step, batches, warmup)


# ------------------------------------------------------------------------------------------------
# 3 + 4. end-to-end `mtrec train` in a subprocess, with its peak RSS


def end_to_end(
    root: Path, workers: int, torch_threads: int = 0, watch_memory: bool = False, shuffle: bool = True
) -> dict:
    """Run `mtrec train` on the bench day; returns its summary JSON + wall time (+ peak memory in
    MiB when `watch_memory`: the /proc scan costs CPU, so throughput runs do not watch)."""
    work = root / f"work-{workers}-{'shuffled' if shuffle else 'ordered'}"
    cfg_path = root / f"bench-{workers}.yaml"
    cfg_path.write_text(yaml.safe_dump(bench_config(str(root / "logs"), str(work), workers, torch_threads, shuffle)))
    cmd = [
        sys.executable,
        "-m",
        "mtrec.cli",
        "train",
        "--config",
        str(cfg_path),
        "--from",
        DAY,
        "--to",
        DAY,
        "--summary",
        str(root / f"summary-{workers}.json"),
        "--force",
    ]
    t0 = time.perf_counter()
    log = root / f"train-{workers}.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True)
        peak = _watch_rss(proc) if watch_memory else 0.0
        proc.wait()
    out = log.read_text()
    if proc.wait() != 0:
        raise SystemExit(f"mtrec train failed:\n{out[-4000:]}")
    summary = json.loads((root / f"summary-{workers}.json").read_text())
    summary.update(wall_s=time.perf_counter() - t0, peak_rss_mib=peak)
    return summary


def _pss(pid: str, page: int) -> int:
    """Proportional set size (shared pages - the Ray object store - split among the processes
    mapping them, so a sum over processes counts them once); RSS where smaps_rollup is missing."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page


def _tree_rss_mib(root: int) -> float:
    """Summed memory (PSS) of `root` and all its descendants, from /proc (Linux)."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parent[int(d)] = int(fields[1])
            rss[int(d)] = _pss(d, page)
        except (OSError, ValueError, IndexError):
            continue
    keep, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in keep:
                keep.add(child)
                frontier.append(child)
    return sum(rss.get(p, 0) for p in keep) / 2**20


def _watch_rss(proc: subprocess.Popen) -> float:
    """Peak of the summed RSS of every process the job started (the Ray cluster included:
    mtrec train starts and stops its own local cluster, so all of it is the job's)."""
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_mib(proc.pid))
        time.sleep(2.0)
    return peak


def _cpu_pressure(since: tuple[float, int] | None = None):
    """Linux PSI: (now, stalled microseconds so far), or with `since` the share of the time since
    then that some task waited for a CPU (the shared machine's load); None where PSI is missing."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    now = (time.monotonic(), int(line.rsplit("total=", 1)[1]))
    if since is None:
        return now
    return (now[1] - since[1]) / 1e6 / max(now[0] - since[0], 1e-9)


def _runs(xs: list[float]) -> str:
    return ", ".join(f"{x:,.0f}" for x in xs)


def sequence_main(args) -> int:
    """The sequence workload: mtrec's DMP step and the plain-PyTorch model, alternating run by run
    (the machine is shared: both sides see the same load), medians of `--repeats` runs."""
    from mtrec.config import parse_config

    ids = f"zipf({args.zipf})" if args.zipf else "uniform"
    hist = f"exactly {SEQ_LEN}" if args.hist_min == SEQ_LEN else f"{args.hist_min}..{SEQ_LEN} (uniform)"
    print(
        f"workload: ESMM + behaviour sequence, {N_SPARSE} sparse features x vocab {VOCAB:,} x dim {DIM}; history "
        f"of {hist} behaviours per row, columns {', '.join(f'hist_{t}' for t in SEQ_TABLES)} sharing the tables "
        f"{', '.join(SEQ_TABLES)}, mean-pooled (masked); towers {TOWER}, batch {BATCH}, ids {ids}; "
        f"{args.ceiling_rows // BATCH} batches per run; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs",
        flush=True,
    )
    table = make_seq_rows(args.ceiling_rows, 7, args.zipf, args.hist_min)
    pressure = _cpu_pressure()
    with tempfile.TemporaryDirectory(prefix="mtrec-bench-") as tmp:
        cfg = parse_config(seq_config(str(Path(tmp) / "logs"), str(Path(tmp) / "work")))
        bags = parse_config(bags_config(str(Path(tmp) / "logs"), str(Path(tmp) / "work")))
        m, p, g = [], [], []
        for _ in range(args.repeats):
            m.append(ceiling(cfg, table, warmup=10))
            p.append(seq_reference(table, warmup=10))
            if args.bags:
                g.append(ceiling(bags, table, warmup=10))
    pressure = _cpu_pressure(pressure)
    mtrec_rps, plain_rps = statistics.median(m), statistics.median(p)
    print(f"sequence mtrec (DMP step, in memory): {mtrec_rps:,.0f} rows/s  (runs: {_runs(m)})")
    print(
        f"sequence plain PyTorch (nn.Embedding sparse, embedding_bag mean + Adagrad, towers + Adam): "
        f"{plain_rps:,.0f} rows/s  (runs: {_runs(p)})"
    )
    if g:
        print(
            f"mtrec with the history as multi-hot mean bags on the shared tables (bag collection, pooled "
            f"kernels): {statistics.median(g):,.0f} rows/s  (runs: {_runs(g)})"
        )
    if pressure is not None:  # the runs are only comparable with one another when this stays low
        print(f"CPU pressure during the runs: {pressure:.0%} of the time something waited for a CPU (Linux PSI)")
    print(f"sequence rows/s mtrec/plain: {mtrec_rps / plain_rps:.2f}", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the bench day (default 1M)")
    ap.add_argument("--ceiling-rows", type=int, default=409_600, help="rows timed in memory (default 200 batches)")
    ap.add_argument("--repeats", type=int, default=3, help="in-memory runs; the median is printed (default 3)")
    ap.add_argument("--zipf", type=float, default=None, help="Zipf exponent of the ids (default: uniform)")
    ap.add_argument("--only", choices=["ceiling", "e2e", "rss"], action="append", help="run only these parts")
    ap.add_argument(
        "--torch-threads", type=int, default=0, help="train.torch_threads of the end-to-end runs (default 0: auto)"
    )
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="world sizes of the end-to-end run")
    ap.add_argument(
        "--shuffle-cost",
        action="store_true",
        help="end-to-end: also run each world size with rows in file order (train.shuffle off), alternating, and "
        "print `shuffle e2e rows/s on/off`",
    )
    ap.add_argument(
        "--workload",
        choices=["issue9", "sequence"],
        default="issue9",
        help="issue9 (default): the parts above; sequence: the same tables plus a behaviour sequence, "
        "mtrec's DMP step vs plain PyTorch, in memory",
    )
    ap.add_argument(
        "--hist-min",
        type=int,
        default=SEQ_LEN,
        help=f"sequence workload: history lengths drawn uniformly from this..{SEQ_LEN} "
        f"(default {SEQ_LEN}: every row has exactly {SEQ_LEN} behaviours)",
    )
    ap.add_argument(
        "--bags",
        action="store_true",
        help="sequence workload: also time mtrec with the history declared as multi-hot mean bags on the "
        "shared tables (the bag collection's pooled kernels)",
    )
    args = ap.parse_args(argv)
    if args.workload == "sequence":
        if set(args.only or ["ceiling"]) != {"ceiling"}:
            ap.error("the sequence workload runs in memory only (no --only e2e/rss)")
        if not 0 <= args.hist_min <= SEQ_LEN:
            ap.error(f"--hist-min must be within 0..{SEQ_LEN}")
        return sequence_main(args)
    parts = set(args.only or ["ceiling", "e2e", "rss"])
    from mtrec.config import parse_config

    ids = f"zipf({args.zipf})" if args.zipf else "uniform"
    print(
        f"workload: ESMM, {N_SPARSE} sparse features x vocab {VOCAB:,} x dim {DIM}, towers {TOWER}, batch {BATCH}, "
        f"ids {ids}; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs",
        flush=True,
    )
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mtrec-bench-") as tmp:
        root = Path(tmp)
        if "ceiling" in parts or "e2e" in parts:
            table = make_rows(args.ceiling_rows, 7, args.zipf)
            cfg = parse_config(bench_config(str(root / "logs"), str(root / "work")))
            c = [ceiling(cfg, table, warmup=10) for _ in range(args.repeats)]
            r = [reference(table, warmup=10) for _ in range(args.repeats)]
            out["ceiling"], out["reference"] = statistics.median(c), statistics.median(r)
            print(
                f"compute ceiling (mtrec DMP step, in memory): {out['ceiling']:,.0f} rows/s  (runs: "
                f"{', '.join(f'{x:,.0f}' for x in c)})"
            )
            print(
                f"plain-PyTorch reference (EmbeddingBag sparse + Adagrad): {out['reference']:,.0f} rows/s  (runs: "
                f"{', '.join(f'{x:,.0f}' for x in r)})"
            )
            print(f"ratio ceiling/reference: {out['ceiling'] / out['reference']:.2f}", flush=True)
        if "e2e" in parts:
            write_day(root / "logs", args.rows, 1, args.zipf)
            for w in args.workers:
                orders = [True, False] if args.shuffle_cost else [True]
                for shuffle in orders:
                    s = end_to_end(root, w, args.torch_threads, shuffle=shuffle)
                    per = "; ".join(
                        f"{x['rows_per_s']:,.0f} rows/s, {x['wait_s']:.1f}s of {x['seconds']:.1f}s waiting for data, "
                        f"{x['convert_s']:.1f}s converting"
                        for x in s["workers"]
                    )
                    print(
                        f"end-to-end mtrec train, {w} worker(s), {s['rows']:,} rows"
                        f"{'' if shuffle else ', rows in file order (shuffle off)'}: "
                        f"{s['rows_per_s']:,.0f} rows/s streaming "
                        f"(per worker: {per}); wall {s['wall_s']:.1f}s incl. Ray start/stop and checkpoint",
                        flush=True,
                    )
                    out[f"e2e{w}" if shuffle else f"e2e{w}-ordered"] = s["rows_per_s"]
                if args.shuffle_cost:
                    print(f"shuffle e2e rows/s on/off, {w} worker(s): {out[f'e2e{w}'] / out[f'e2e{w}-ordered']:.2f}")
            if "ceiling" in out and "e2e1" in out:
                print(f"ratio end-to-end/ceiling: {out['e2e1'] / out['ceiling']:.2f}")
        if "rss" in parts:
            peaks = {}
            for mult in (1, 4):
                r = root / f"rss{mult}"
                write_day(r / "logs", args.rows * mult, 2, args.zipf)
                s = end_to_end(r, 1, args.torch_threads, watch_memory=True)
                peaks[mult] = s["peak_rss_mib"]
                print(
                    f"peak RSS, 1 worker, {s['rows']:,} rows: {peaks[mult]:,.0f} MiB (wall {s['wall_s']:.1f}s)",
                    flush=True,
                )
            print(f"ratio peak RSS {4 * args.rows:,} / {args.rows:,} rows: {peaks[4] / peaks[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
