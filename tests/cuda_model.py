"""A CPU model of CUDA's device and synchronisation rules, for the tests.

A :class:`ModelTensor` reports the model device (``meta:0``: a CPU-only torch build aborts
on a ``cuda`` device inside autograd) and holds a real CPU tensor, so every result is a
real number. Inside ``with CudaRules() as rules:`` each aten op is run on the CPU data and
checked the way CUDA would check it:

* **device mismatch** — a CPU tensor meeting a device tensor where CUDA raises: any CPU
  tensor with dimensions, or a 0-dim CPU tensor in an op that is not element-wise
  (``searchsorted``, ``cat``, ``mm``, ...). Index tensors of advanced indexing may live on
  the CPU (CUDA moves them).
* **host sync** — ops after which the host waits for the device: reading a value
  (``item``/``bool``/``int``/``float``), ops whose output size depends on the data
  (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``,
  ``repeat_interleave`` without ``output_size``), ``bincount`` (reads the maximum),
  ``equal``, ``masked_fill`` with a device 0-dim value (read back as a scalar),
  device-to-host copies and blocking host-to-device copies.

Each event records the innermost ``pml_tcm`` or ``pytorch_metric_learning`` frame that
issued it, so a test can tell our syncs from pml's.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map

MODEL_DEVICE = torch.device("meta", 0)
aten = torch.ops.aten

_INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}
_COPIES = {aten._to_copy.default, aten.copy_.default, aten.lift_fresh.default}
_ELEMENTWISE_EXTRA = {
    aten.where.self,
    aten.where.self_out,
    aten.masked_fill.Tensor,
    aten.masked_fill_.Tensor,
    aten.fill_.Tensor,
}
_DATA_DEPENDENT = {
    aten._local_scalar_dense.default: "value read by the host (item/bool/int/float)",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique_consecutive",
    aten.bincount.default: "bincount (reads the maximum)",
    aten.equal.default: "equal",
    aten.is_nonzero.default: "is_nonzero",
}


class ModelTensor(torch.Tensor):
    """A tensor on the model device, backed by the CPU tensor ``data_``."""

    data_: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> ModelTensor:
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=MODEL_DEVICE,
            requires_grad=data.requires_grad,
        )
        wrapper.data_ = data
        return wrapper

    def __repr__(self) -> str:
        return f"ModelTensor({self.data_!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a ModelTensor outside CudaRules()")


def on_model_device(tensor: torch.Tensor, requires_grad: bool = False) -> ModelTensor:
    """A copy of a CPU tensor on the model device (a leaf when ``requires_grad``)."""
    moved = ModelTensor(tensor.detach().clone())
    return moved.requires_grad_() if requires_grad else moved


def to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """The CPU data of a model tensor (outside :class:`CudaRules`), or the tensor itself."""
    return tensor.data_ if isinstance(tensor, ModelTensor) else tensor


@dataclass(frozen=True)
class Event:
    kind: str  # "mismatch" or "sync"
    op: str
    detail: str
    where: str  # innermost pml_tcm / pml frame, "file:line"
    ours: bool  # that frame is pml_tcm's


def _caller() -> tuple[str, bool]:
    for frame in reversed(traceback.extract_stack()):
        for package in ("/pml_tcm/", "/pytorch_metric_learning/"):
            if package in frame.filename:
                short = package.strip("/") + "/" + frame.filename.split(package, 1)[1]
                return f"{short}:{frame.lineno}", package == "/pml_tcm/"
    return "?", False


def _is_model_device(device: object) -> bool:
    return device is not None and torch.device(device).type == MODEL_DEVICE.type


class CudaRules(TorchDispatchMode):
    """Run ops on the CPU data of model tensors and record what CUDA would object to."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []

    def __enter__(self) -> CudaRules:
        # torch.tensor(data, device=...) fills the tensor below the dispatcher, where a
        # mode cannot see it: build it on the host and move it, as CUDA would copy it.
        self._tensor = torch.tensor
        host_tensor = self._tensor

        def tensor(data, *args, device=None, **kwargs):
            if _is_model_device(device):
                return host_tensor(data, *args, **kwargs).to(device)
            return host_tensor(data, *args, device=device, **kwargs)

        torch.tensor = tensor
        return super().__enter__()

    def __exit__(self, *exc_info) -> None:
        torch.tensor = self._tensor
        return super().__exit__(*exc_info)

    def _record(self, kind: str, func, detail: str) -> None:
        where, ours = _caller()
        self.events.append(Event(kind, str(func), detail, where, ours))

    def mismatches(self) -> list[Event]:
        return [e for e in self.events if e.kind == "mismatch"]

    def syncs(self, ours_only: bool = True) -> list[Event]:
        return [e for e in self.events if e.kind == "sync" and (e.ours or not ours_only)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if isinstance(t, ModelTensor)]
        on_host = [t for t in tensors if not isinstance(t, ModelTensor)]
        to_device = _is_model_device(kwargs.get("device"))
        to_host = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
        if to_device:
            kwargs["device"] = torch.device("cpu")

        if on_device and on_host:
            self._check_mixing(func, args, on_host)
        if on_device:
            self._check_sync(func, args, kwargs)
        if func is aten._to_copy.default:
            if isinstance(args[0], ModelTensor) and to_host:
                self._record("sync", func, "device-to-host copy")
            if (
                not isinstance(args[0], ModelTensor)
                and to_device
                and not kwargs.get("non_blocking", False)
            ):
                self._record("sync", func, "blocking host-to-device copy")
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if isinstance(src, ModelTensor) and not isinstance(dst, ModelTensor):
                self._record("sync", func, "device-to-host copy_")
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if isinstance(dst, ModelTensor) and not isinstance(src, ModelTensor):
                if src.dim() > 0 and not non_blocking:
                    self._record("sync", func, "blocking host-to-device copy_")

        def unwrap(x):
            return x.data_ if isinstance(x, ModelTensor) else x

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if func is aten._to_copy.default:
            result_on_device = to_device or (isinstance(args[0], ModelTensor) and not to_host)
        elif func is aten.copy_.default:
            result_on_device = isinstance(args[0], ModelTensor)
        else:
            result_on_device = to_device or (bool(on_device) and not to_host)
        if not result_on_device:
            return out

        def wrap(x):
            if isinstance(x, torch.Tensor) and not isinstance(x, ModelTensor):
                return ModelTensor(x)
            return x

        out = tree_map(wrap, out)
        try:
            return return_and_correct_aliasing(func, args, kwargs, out)
        except Exception:  # ops whose alias info the helper cannot replay
            return out

    def _check_mixing(self, func, args, on_host: list[torch.Tensor]) -> None:
        if func in _COPIES:
            return
        if func in _INDEXING:
            values = args[2] if func is not aten.index.Tensor else None
            if isinstance(values, torch.Tensor) and not isinstance(values, ModelTensor):
                if values.dim() > 0:
                    self._record("mismatch", func, "index_put values on the host")
            return
        elementwise = torch.Tag.pointwise in func.tags or func in _ELEMENTWISE_EXTRA
        offending = [t for t in on_host if t.dim() > 0 or not elementwise]
        if offending:
            shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in offending)
            self._record("mismatch", func, f"host tensors {shapes}")

    def _check_sync(self, func, args, kwargs) -> None:
        if func in _DATA_DEPENDENT:
            self._record("sync", func, _DATA_DEPENDENT[func])
        elif func in _INDEXING:
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self._record("sync", func, "boolean-mask indexing")
        elif func is aten.repeat_interleave.Tensor:
            if kwargs.get("output_size") is None:
                self._record("sync", func, "repeat_interleave without output_size")
        elif func in (aten.masked_fill.Tensor, aten.masked_fill_.Tensor):
            if isinstance(args[2], ModelTensor):
                self._record("sync", func, "masked_fill with a device value")
