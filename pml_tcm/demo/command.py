"""``pml-tcm demo``: check every setting, then train, print and write the results.

Order: the settings (:func:`pml_tcm.demo.settings.check_settings`), the optional
packages, the data set, then the header and the arms. Any bad setting ends the command
before anything is trained or written (one line on stderr, exit code 2, through
:func:`pml_tcm.cli.main`).
"""

from __future__ import annotations

import argparse
import time

from .settings import (
    DEFAULT_EPOCHS,
    DEFAULT_THREADS,
    QUICK_SAMPLES,
    DemoSettingsError,
    check_settings,
    describe_tcm,
    resolve_tcm,
)

WIDTH = 100  # the demo's printed lines wrap here


def run_demo(args: argparse.Namespace, device: str) -> int:
    """Run ``pml-tcm demo`` with parsed ``args`` on ``device`` (``"cpu"`` or ``"cuda"``).

    Raises:
        DemoSettingsError: a bad setting, a missing optional package or data set, all
            found before any training.
    """
    check_settings(args)
    circle = not args.no_circle
    tcm = resolve_tcm(
        args.dataset,
        list(args.losses) + (["arcface"] if circle and "arcface" not in args.losses else []),
        args.tcm_weight,
        args.pos_margin,
        args.neg_margin,
    )
    _check_extras(args.dataset, figures=not args.train_only)

    import torch

    from .benchmark import (
        arm_groups,
        arm_label,
        benchmark_configs,
        describe_runs,
        describe_settings,
        describe_split,
        run_benchmark,
    )
    from .data import DatasetError, load_split
    from .experiment import ArmConfig, make_accuracy_calculator
    from .progress import ArmProgress, quiet_pml
    from .results_table import fill, table_key

    try:
        split = load_split(args.dataset, args.data_dir)
    except DatasetError as error:
        raise DemoSettingsError(str(error)) from error
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[args.dataset]
    max_batches = args.max_batches
    if args.quick:
        split = split.subsample(QUICK_SAMPLES, QUICK_SAMPLES)
        epochs, max_batches = 1, 2 if max_batches is None else max_batches
    if args.batch_size > len(split.train_y):
        raise DemoSettingsError(
            f"--batch-size {args.batch_size} exceeds the {len(split.train_y)} training images"
        )
    base = ArmConfig(
        epochs=epochs,
        batch_size=args.batch_size,
        embedding_size=args.embedding_size,
        lr=args.lr,
        max_batches=max_batches,
        tcm_miner=args.tcm_miner,
        far_range=tuple(args.far_range),
        device=device,
    )
    try:
        make_accuracy_calculator(base)  # the OPIS settings, before any training
    except ValueError as error:
        raise DemoSettingsError(f"--far-range: {error}") from error
    configs = benchmark_configs(base, args.losses, args.seeds, circle, tcm)
    groups = arm_groups(configs)
    seeds = len(args.seeds)
    output_dir = "none (--train-only)" if args.train_only else f"{args.out}/"
    print("pml-tcm demo: does one similarity threshold hold on classes never seen in training?")
    for name, text in (
        ("data", describe_split(split)),
        ("runs", describe_runs(configs, args.losses, args.seeds, circle)),
        ("settings", describe_settings(base)),
        ("TCM", describe_tcm(tcm, args.tcm_miner)),
        ("output", output_dir),
    ):
        print(fill(f"  {name:<9} {text}", WIDTH, indent=" " * 12))
    print(flush=True)
    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    threads = args.threads if args.threads is not None else DEFAULT_THREADS.get(args.dataset)
    width = max(len(arm_label(group)) for group in groups)
    progress = ArmProgress(len(groups), name_width=width)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with quiet_pml():
            output = run_benchmark(
                split,
                base,
                args.out,
                args.losses,
                args.seeds,
                circle=circle,
                checkpoint_dir=args.checkpoint_dir,
                train_only=args.train_only,
                progress=progress,
                target_far=args.target_far,
                tcm=tcm,
            )
    finally:
        torch.set_num_threads(threads_before)
    if not args.train_only:
        print()
        print(f"Results on the unseen classes, {seeds} seed{'s' if seeds > 1 else ''} per arm:")
        print(output.table)
        print(fill(table_key(seeds), WIDTH))
        print()
        print(output.reading)
        print()
        print(f"Files in {args.out}/:")
        described = output.file_descriptions()
        width = max(len(path.name) for path, _ in described)
        for path, what in described:
            print(f"  {path.name:<{width}}  {what}")
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return 0


def _check_extras(dataset: str, figures: bool) -> None:
    from .extras import INSTALL, missing_packages

    needed = (["sklearn.datasets"] if dataset == "digits" else []) + (
        ["matplotlib.figure"] if figures else []
    )
    missing = missing_packages(needed)
    if missing:
        raise DemoSettingsError(f"the demo needs {' and '.join(missing)}: {INSTALL}")
