"""The checks to run when a CUDA GPU is at hand, then both benchmarks on it.

    python benchmarks/gpu_check.py            # checks only, about two minutes
    python benchmarks/gpu_check.py --bench    # then tcm_speed, opis_speed, evaluation_speed

Each check prints ``[PASS]``/``[FAIL]`` with what it measured; a failure names the
pml_tcm file:line it came from. The checks: host syncs of the TCM step in eager mode
(``torch.cuda.set_sync_debug_mode``), the miner's syncs, OPIS on CUDA (plain, guide and
pivot paths of the FAR search) against the CPU, OPIS's syncs (a constant: the same
for every N and number of chunks), the sync-free engine against the gathering one on
CUDA (bit-equal), calibration and
the calculator on CUDA, the ``report`` path, fp16/bf16 autocast, ``torch.compile``
(inductor, aot_eager, ``reduce-overhead``), deterministic mode.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
import warnings

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call

import torch  # noqa: E402

FAILURES: list[str] = []


def _origin(error: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "pml_tcm" in f.filename]
    return f"{frames[-1].filename.split('pml_tcm')[-1]}:{frames[-1].lineno}" if frames else "?"


ONLY: str | None = None


def check(name: str, fn) -> None:
    if ONLY is not None and ONLY not in name:
        return
    start = time.perf_counter()
    try:
        out = fn()
        print(f"[PASS] {name} ({time.perf_counter() - start:.1f}s) {out or ''}", flush=True)
    except Exception as error:  # noqa: BLE001 - report every failure and go on
        FAILURES.append(name)
        message = str(error).splitlines()[0][:300] if str(error) else ""
        print(f"[FAIL] {name}: {type(error).__name__} at {_origin(error)}: {message}", flush=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def our_sync_warnings(fn) -> list[str]:
    """Run ``fn`` in sync-debug "warn" mode; the warnings raised from pml_tcm's code."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    ours = []
    for w in caught:
        if "synchroniz" in str(w.message) and "pml_tcm" in w.filename:
            ours.append(f"{w.filename.split('pml_tcm')[-1]}:{w.lineno}")
    return ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="then run both benchmarks")
    parser.add_argument("--only", default=None, help="run only the checks whose name has this")
    args = parser.parse_args()
    global ONLY
    ONLY = args.only
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device", file=sys.stderr)
        return 2

    from pytorch_metric_learning import losses

    from pml_tcm import (
        OPISAccuracyCalculator,
        TCMMiner,
        TCMRegularizer,
        calibrate_threshold,
        with_tcm,
    )
    from pml_tcm.embedding_report import compute_report
    from pml_tcm.functional import opis, tcm_loss

    cuda = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    g = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(256, 64, generator=g)
    y_cpu = torch.randint(0, 8, (256,), generator=g)
    x, y = x_cpu.to(cuda), y_cpu.to(cuda)
    margins = {"pos_margin": 0.5, "neg_margin": 0.0}

    # 1. TCM step: zero host syncs in eager mode with check_inputs=False.
    def tcm_step(pairs: bool, labels):
        leaf = x.clone().requires_grad_()
        mined = TCMMiner(**margins)(x, y) if pairs else None
        regularizer = TCMRegularizer(check_inputs=False, **margins)
        regularizer(leaf, labels, mined).backward()  # first call: allocator, kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        regularizer(leaf, labels, mined).backward()
        return "no sync"

    check("1a TCMRegularizer fwd+bwd, sync_debug=error", lambda: tcm_step(False, y))
    check("1b ... with indices_tuple", lambda: tcm_step(True, y))
    check("1c ... labels on the host (as pml's trainers pass them)", lambda: tcm_step(False, y_cpu))

    def with_tcm_syncs(make_loss):
        loss_fn = with_tcm(make_loss(), regularizer=TCMRegularizer(check_inputs=False, **margins))
        loss_fn = loss_fn.to(cuda)
        leaf = x.clone().requires_grad_()
        ours = our_sync_warnings(lambda: loss_fn(leaf, y_cpu).backward())
        if ours:
            raise AssertionError(f"syncs from pml_tcm: {ours}")
        return "none from pml_tcm (pml's own may sync)"

    check("1d with_tcm(MultiSimilarityLoss)", lambda: with_tcm_syncs(losses.MultiSimilarityLoss))
    check("1e with_tcm(ArcFaceLoss)", lambda: with_tcm_syncs(lambda: losses.ArcFaceLoss(8, 64)))

    def miner_syncs():
        mined = []
        ours = our_sync_warnings(lambda: mined.append(TCMMiner(check_inputs=False)(x, y_cpu)))
        expected = TCMMiner()(x_cpu, y_cpu)
        same = all(torch.equal(a.cpu(), b) for a, b in zip(mined[0], expected))
        return f"syncs from pml_tcm: {ours} (nonzero sizes the output); equal to CPU: {same}"

    check("1f TCMMiner syncs", miner_syncs)

    # 2. OPIS and calibration on CUDA against the CPU.
    centres = torch.randn(5, 64, generator=g)
    q_cpu = centres[torch.arange(5000) % 5] * 0.5 + torch.randn(5000, 64, generator=g)
    ql_cpu = torch.arange(5000) % 5
    q, ql = q_cpu.to(cuda), ql_cpu.to(cuda)

    def opis_vs_cpu(n: int, **settings):
        on_gpu = opis(q[:n], ql[:n], **settings)
        on_cpu = opis(q_cpu[:n], ql_cpu[:n], **settings)
        return (
            f"opis cuda {on_gpu.opis:.6g} cpu {on_cpu.opis:.6g}; eps cuda {on_gpu.eps_opis:.6g} "
            f"cpu {on_cpu.eps_opis:.6g}; range cuda {on_gpu.calibration_range} "
            f"cpu {on_cpu.calibration_range}"
        )

    check("2a opis 5000 x 5 classes (20M negatives: guide path)", lambda: opis_vs_cpu(5000))
    check(
        "2b opis pivot path (collect_limit=20, retain_limit=0)",
        lambda: opis_vs_cpu(600, collect_limit=20, retain_limit=0),
    )

    def opis_syncs(**settings):
        counts = {}
        for n, chunk in ((2000, 500), (4000, 1000), (4000, 250)):
            opis(q[:n], ql[:n], chunk_size=chunk, **settings)  # warm-up (allocator, kernels)
            counts[(n, chunk)] = len(
                our_sync_warnings(
                    lambda n=n, chunk=chunk: opis(q[:n], ql[:n], chunk_size=chunk, **settings)
                )
            )
        if len(set(counts.values())) != 1:
            raise AssertionError(f"syncs grow with N or the chunks: {counts}")
        return f"syncs by (N, chunk_size): {counts}"

    check("2c OPIS syncs, FAR range: one constant for every N and chunks", opis_syncs)
    check(
        "2c' OPIS syncs, explicit calibration_range: one constant",
        lambda: opis_syncs(calibration_range=(0.0, 0.6)),
    )

    def sync_free_vs_gathering():
        from pml_tcm.functional import streaming

        groups = (torch.arange(3000, device=cuda) * 7) % 3
        runs = []
        for sync_free in (True, False):
            streaming.SYNC_FREE = sync_free
            try:
                results = [
                    opis(q[:3000], ql[:3000], groups=g, collect_limit=c, chunk_size=700)
                    for g in (None, groups)
                    for c in (1 << 22, 5000)
                ]
                report = calibrate_threshold(q[:3000], ql[:3000], target_far=1e-2)
                frr = calibrate_threshold(q[:3000], ql[:3000], target_frr=0.1)
            finally:
                streaming.SYNC_FREE = None
            runs.append(
                [(r.opis, r.eps_opis, r.calibration_range) for r in results]
                + [(report.threshold, report.class_far.tolist(), frr.threshold)]
            )
        if runs[0] != runs[1]:
            raise AssertionError(f"sync-free {runs[0]} != gathering {runs[1]}")
        return f"bit-equal: {runs[0][0]}"

    check(
        "2i sync-free engine == gathering engine on CUDA (opis, groups, calibration)",
        sync_free_vs_gathering,
    )
    check(
        "2d OPISAccuracyCalculator() default device (pml picks CUDA) on 5000",
        lambda: OPISAccuracyCalculator(include=("opis", "eps_opis")).get_accuracy(q_cpu, ql_cpu),
    )
    check(
        "2e calibrate_threshold CUDA vs CPU",
        lambda: [
            (
                calibrate_threshold(q[:1500], ql[:1500], **t).threshold,
                calibrate_threshold(q_cpu[:1500], ql_cpu[:1500], **t).threshold,
            )
            for t in ({"target_far": 1e-2}, {"target_frr": 0.1})
        ],
    )

    def report_paths():
        e, lab = q_cpu[:1500].numpy(), ql_cpu[:1500].numpy()
        on_gpu, on_cpu = compute_report(e, lab, device="cuda"), compute_report(e, lab)
        return f"cuda {on_gpu.metrics} / cpu {on_cpu.metrics}"

    check("2f report path on cuda vs cpu", report_paths)

    def large_labels():
        big = ql_cpu[:1500] + 2**62
        calculator = OPISAccuracyCalculator(include=("precision_at_1", "opis"), device=cuda)
        on_gpu = calculator.get_accuracy(q[:1500], big.to(cuda))
        dense = calculator.get_accuracy(q[:1500], ql[:1500])
        threshold = calibrate_threshold(q[:1500], big.to(cuda), target_far=1e-2).threshold
        dense_threshold = calibrate_threshold(q[:1500], ql[:1500], target_far=1e-2).threshold
        if on_gpu != dense or threshold != dense_threshold:
            raise AssertionError(f"{on_gpu} vs {dense}; {threshold} vs {dense_threshold}")
        return f"labels 2**62 + y == labels y: {on_gpu}"

    check("2g labels >= 2^24 on CUDA (calculator, calibration)", large_labels)

    def drop_in_vs_pml():
        from pml_tcm.losses import ThresholdConsistentMarginLoss as DropIn

        leaf_a, leaf_b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = DropIn()(leaf_a, y)
        theirs = losses.ThresholdConsistentMarginLoss()(leaf_b, y)
        ours.backward()
        theirs.backward()
        grad_gap = (leaf_a.grad - leaf_b.grad).abs().max().item()
        return f"drop-in {ours.item():.6f} pml {theirs.item():.6f}; max grad gap {grad_gap:.2e}"

    check("2h drop-in ThresholdConsistentMarginLoss vs pml's on CUDA", drop_in_vs_pml)

    # 3. Autocast: the TCM term stays float32; gradients match float32.
    def autocast():
        qq = torch.randn(256, 32, device=cuda)
        r = torch.randn(1024, 32, device=cuda)
        lab = torch.randint(0, 2, (256,), device=cuda)
        rl = torch.randint(0, 2, (1024,), device=cuda)
        out = {}
        for name, dtype in (("fp32", None), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            leaf = qq.clone().requires_grad_()
            with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
                loss = tcm_loss(leaf, lab, r, rl, pos_margin=0.9, neg_margin=0.5, neg_weight=0.0)
            loss.backward()
            out[name] = (loss.dtype, round(loss.item(), 6), f"{leaf.grad.norm().item():.4e}")
        if len({v[1:] for v in out.values()}) != 1:
            raise AssertionError(f"autocast changed the term: {out}")
        return out

    check("3 autocast fp16/bf16 (>65504 hard pairs) == fp32", autocast)

    # 4. torch.compile on CUDA.
    def compiled(backend: str, mode: str | None = None):
        torch._dynamo.reset()
        regularizer = TCMRegularizer(check_inputs=False, **margins)
        step = torch.compile(regularizer, fullgraph=True, backend=backend, mode=mode)
        leaf = x.clone().requires_grad_()
        expected = TCMRegularizer(**margins)(x.clone().requires_grad_(), y)

        def one_step() -> torch.Tensor:
            # CUDA graphs (reduce-overhead) reuse their output buffers on the next replay:
            # mark each training step and keep a copy of what is read later
            torch.compiler.cudagraph_mark_step_begin()
            leaf.grad = None  # (an accumulated .grad would read the last replay's buffer)
            value = step(leaf, y)
            kept = value.detach().clone()
            value.backward()
            return kept

        for _ in range(2):
            one_step()  # compile and warm up outside debug mode
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(3):
            value = one_step()
        torch.cuda.set_sync_debug_mode(0)
        return f"no sync; value {value.item():.6f} eager {expected.item():.6f}"

    check("4a compile(fullgraph, inductor), sync_debug=error", lambda: compiled("inductor"))
    check("4b compile(fullgraph, aot_eager), sync_debug=error", lambda: compiled("aot_eager"))
    check("4c compile(inductor, reduce-overhead)", lambda: compiled("inductor", "reduce-overhead"))
    check(
        "4d compile(TCMMiner)",
        lambda: [t.numel() for t in torch.compile(TCMMiner(**margins))(x, y)],
    )

    # 5. Deterministic mode.
    def deterministic():
        torch.use_deterministic_algorithms(True)
        try:
            grads = []
            for _ in range(3):
                leaf = x.clone().requires_grad_()
                mined = TCMMiner(**margins)(x, y)
                TCMRegularizer(check_inputs=False, **margins)(leaf, y, mined).backward()
                grads.append(leaf.grad)
            results = [opis(q[:600], ql[:600], collect_limit=50).opis for _ in range(2)]
            calibrate_threshold(q[:600], ql[:600], target_far=1e-2)
            same = all(torch.equal(grads[0], grad) for grad in grads[1:])
            return f"bitwise-equal grads: {same}; opis repeats {results}"
        finally:
            torch.use_deterministic_algorithms(False)

    check("5 use_deterministic_algorithms(True)", deterministic)

    def demo_cpu():
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pml_tcm",
                "demo",
                "--quick",
                "--device",
                "cpu",
                "--out",
                "/tmp/gpu_check_demo",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        if run.returncode:
            raise AssertionError(run.stderr.strip().splitlines()[-1])
        return "exit 0"

    check("6 pml-tcm demo --quick --device cpu on a GPU host", demo_cpu)

    print(f"\n{len(FAILURES)} failed: {FAILURES}", flush=True)
    if args.bench:
        here = os.path.dirname(os.path.abspath(__file__))
        for script, options in (
            ("tcm_speed.py", ["--sizes", "256", "1024", "4096", "16384"]),
            ("opis_speed.py", ["--sizes", "5000", "20000", "100000"]),
            # OPIS, calibration and the whole report against the matmul floor (target <= 3x)
            ("evaluation_speed.py", ["--sizes", "100000", "--threads", "16"]),
        ):
            print(f"\n$ python benchmarks/{script} --device cuda {' '.join(options)}")
            subprocess.run(
                [sys.executable, os.path.join(here, script), "--device", "cuda", *options],
                check=False,
            )
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
