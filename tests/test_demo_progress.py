"""The demo's progress lines and quiet_pml: pml's bars and harmless warnings off only inside."""

from __future__ import annotations

import io
import warnings

import torch
from pytorch_metric_learning import losses, trainers
from pytorch_metric_learning.testers import base_tester
from pytorch_metric_learning.trainers import base_trainer

from pml_tcm.demo.progress import ArmProgress, quiet_pml


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _screen(raw: str) -> list[str]:
    """What a terminal shows: each line keeps the text after its last carriage return."""
    return [line.rsplit("\r", 1)[-1].rstrip() for line in raw.split("\n") if line]


def _train_two_batches() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    dataset = torch.utils.data.TensorDataset(torch.randn(20, 4), torch.arange(20) % 2)
    trainers.MetricLossOnly(
        models={"trunk": model},
        optimizers={"trunk_optimizer": torch.optim.SGD(model.parameters(), lr=0.1)},
        batch_size=10,
        loss_funcs={"metric_loss": losses.ContrastiveLoss()},
        dataset=dataset,
        iterations_per_epoch=2,
        data_device=torch.device("cpu"),
        dataloader_num_workers=0,
    ).train(num_epochs=1)


LOSS_WARNING = (
    "Converting a tensor with requires_grad=True to a scalar may lead to unexpected behavior."
)


def _warn_like_torch() -> None:
    # torch raises this one only once per process (TORCH_WARN_ONCE), so the test warns
    # with the same category and text itself
    warnings.warn(LOSS_WARNING, UserWarning, stacklevel=1)


def test_quiet_pml_hides_bars_and_the_loss_warning_only_inside(capfd):
    with warnings.catch_warnings(record=True):  # pml's own loss warning, outside
        _train_two_batches()
    assert "2/2" in capfd.readouterr().err  # pml's tqdm bar, as pml draws it
    originals = (base_trainer.tqdm, base_tester.tqdm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_pml():
            _train_two_batches()
            _warn_like_torch()
            warnings.warn("another warning", UserWarning, stacklevel=1)
        inside = [str(w.message) for w in caught]
        _warn_like_torch()
        after = [str(w.message) for w in caught][len(inside) :]
    assert capfd.readouterr().err == ""
    assert LOSS_WARNING not in inside and "another warning" in inside  # only the known one
    assert after == [LOSS_WARNING]
    assert (base_trainer.tqdm, base_tester.tqdm) == originals


def test_quiet_pml_restores_after_an_error():
    originals = (base_trainer.tqdm, base_tester.tqdm)
    try:
        with quiet_pml():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert (base_trainer.tqdm, base_tester.tqdm) == originals


def _two_arms(progress: ArmProgress) -> None:
    for name in ("first arm", "second arm"):
        progress.start(name, epochs=3)
        for epoch in (1, 2, 3):
            progress.update(epoch, 1.0 / epoch)
        progress.finish(f"{name} done")


def test_plain_output_is_one_line_per_arm():
    stream = io.StringIO()
    _two_arms(ArmProgress(2, stream=stream, name_width=10))
    assert "\r" not in stream.getvalue()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[1/2] first arm ") and "first arm done" in lines[0]
    assert lines[1].startswith("[2/2] second arm") and "second arm done" in lines[1]


def test_plain_output_shows_a_heartbeat_for_slow_arms():
    stream = io.StringIO()
    _two_arms(ArmProgress(2, stream=stream, heartbeat_s=0.0))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 8  # 3 epoch lines and a result line per arm
    assert "epoch 2/3  loss 0.5000" in lines[1]


def test_terminal_output_redraws_one_line_per_arm_in_place():
    stream = _Terminal()
    _two_arms(ArmProgress(2, stream=stream, redraw_s=0.0))
    raw = stream.getvalue()
    assert raw.count("\n") == 2
    assert "epoch 3/3  loss 0.3333" in raw  # drawn while training
    screen = _screen(raw)
    assert len(screen) == 2
    assert screen[0].startswith("[1/2] first arm") and screen[0].split("  (")[0].endswith(
        "first arm done"
    )
    assert "epoch" not in screen[1]  # the result overwrote the progress text


def test_an_arm_of_several_seeds_is_one_line_that_shows_the_running_seed():
    stream = _Terminal()
    progress = ArmProgress(1, stream=stream, redraw_s=0.0)
    progress.start("ArcFace, seeds 0-2", epochs=2, runs=3)
    for seed in (0, 1, 2):
        progress.next_run(f"seed {seed}")
        for epoch in (1, 2):
            progress.update(epoch, 0.5)
    progress.finish("mean R@1 90.00 %")
    raw = stream.getvalue()
    assert "seed 1 (2/3)  epoch 2/2  loss 0.5000" in raw  # drawn while seed 1 trained
    assert raw.count("\n") == 1
    (line,) = _screen(raw)
    assert line.startswith("[1/1] ArcFace, seeds 0-2  mean R@1 90.00 %")
