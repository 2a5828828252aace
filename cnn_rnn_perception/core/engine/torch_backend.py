"""
The torch backend: camera frames in, class probabilities and stage timings out.

What it does differently from running the model the tutorial way (fp32, eager, one image at a
time, everything on the host):

- BatchNorm is folded into the convolutions, and the trunk runs in the chosen precision
  (bf16 or fp16 on a GPU) in channels-last layout, compiled with ``torch.compile``. The RNN
  and head stay in float32: reduced-precision LSTMs are where numerical trouble lives.
- Every frame is resized on one path, whatever it is batched with: OpenCV on the host on a CPU;
  on a GPU the uint8 frame is uploaded from pinned memory and resized and normalised there.
- Static buffers per batch size: the model-size input, the probabilities and their host copy.
  On a GPU the model (input to probabilities) is captured once per batch size as a CUDA graph
  and replayed; the same buffer code runs on the CPU, with the model run eagerly instead of
  replayed, so tests exercise it. Keys depend on the batch size alone, so a warm-up of the
  batch sizes in use covers every camera resolution and colour order: nothing is compiled or
  captured in the inference thread after it.
- Frames from several cameras run as one batch; with a temporal model each camera keeps its
  own state, in a table on the device that the captured graph reads and writes.

No ROS imports: the node, the tools and the tests all drive this directly.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import time
from typing import Any, Callable, Sequence

from cnn_rnn_perception.core.backbones import first_convolution
from cnn_rnn_perception.core.checkpoint import default_labels, load_checkpoint, seeded
from cnn_rnn_perception.core.engine.base import (
    EngineBase, EngineSettings, precision_name, resolve_device, resolve_precision)
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import ModelConfig, Preprocessing
from cnn_rnn_perception.core.preprocess import (
    frames_to_tensor_torch, frames_to_uint8_batch, normalisation, normalise_uint8_batch)
import numpy as np
import torch
import torch.nn.utils.fusion

_LOG = logging.getLogger(__name__)


@contextlib.contextmanager
def compile_scope():
    """
    Apply the compiler settings the trunk compiles under, for the engine's own calls only.

    Freezing treats the weights as constants, folded and pre-packed for oneDNN: on the CPU that
    is most of the gain over eager (measured: resnet18 9.4 ms vs 11.7 ms). One compiled graph
    per batch size needs more than dynamo's default 8 recompiles. Both are read lazily when a
    graph compiles, inside the call, and ``torch.compile(options={'freezing': True})`` is
    ignored in torch 2.14, so the engine patches them around its own calls and restores them:
    other code in the process (a training loop, another model) compiles as it would without us.
    """
    from torch import _dynamo, _inductor
    # torch 2.6 renamed cache_size_limit to recompile_limit; torch 2.11 and 2.14 have both.
    limit = 'recompile_limit' if hasattr(_dynamo.config, 'recompile_limit') \
        else 'cache_size_limit'
    with _inductor.config.patch(freezing=True), _dynamo.config.patch(**{limit: 64}):
        yield


def fold_batch_norm(trunk: torch.nn.Module, input_size: Sequence[int]) -> torch.nn.Module:
    """
    Return ``trunk`` with each eval-mode BatchNorm folded into the convolution feeding it.

    torch.fx would find the pairs too, but its tracer patches ``torch.nn.Module.__call__`` for
    the whole process while it traces: a model running in another thread at that moment (the
    node's engine, serving while its replacement builds) is traced instead of run, and fails.
    Here forward hooks on the trunk's own modules, over one example image, find each BatchNorm
    whose input is a convolution's output, untouched since. A pair is folded only if both run
    once, and the folded trunk must reproduce the original on a second image, or the trunk
    runs unfolded: the hooks cannot see whether that output is also read elsewhere.
    """
    trunk = trunk.eval()
    produced: dict[int, tuple[torch.nn.Module, torch.Tensor, int]] = {}
    pairs: list[tuple[torch.nn.Module, torch.nn.Module]] = []
    calls: dict[torch.nn.Module, int] = {}

    def after_conv(conv, inputs, output):
        calls[conv] = calls.get(conv, 0) + 1
        produced[id(output)] = (conv, output, output._version)

    def before_norm(norm, inputs):
        calls[norm] = calls.get(norm, 0) + 1
        conv, output, version = produced.get(id(inputs[0]), (None, None, None))
        if output is inputs[0] and output._version == version:
            pairs.append((conv, norm))

    hooks = [module.register_forward_hook(after_conv) for module in trunk.modules()
             if type(module) is torch.nn.Conv2d]
    hooks += [module.register_forward_pre_hook(before_norm) for module in trunk.modules()
              if type(module) is torch.nn.BatchNorm2d and module.track_running_stats]
    generator = torch.Generator().manual_seed(0)
    channels = first_convolution(trunk)[1].in_channels
    examples = torch.rand(2, 1, channels, *input_size, generator=generator)
    try:
        with torch.no_grad():
            trunk(examples[0])
    except Exception as error:  # a trunk that cannot run here is left for the engine to report
        _LOG.info('BatchNorm folding skipped (%s); the trunk runs unfolded', error)
        return trunk
    finally:
        for hook in hooks:
            hook.remove()
    names = {module: name for name, module in trunk.named_modules()}
    foldable = [(names[conv], names[norm]) for conv, norm in pairs
                if calls[conv] == 1 and calls[norm] == 1
                and conv.out_channels == norm.num_features]
    if not foldable:
        return trunk
    folded = copy.deepcopy(trunk)
    for conv_name, norm_name in foldable:
        conv = folded.get_submodule(conv_name)
        norm = folded.get_submodule(norm_name)
        _replace(folded, conv_name, torch.nn.utils.fusion.fuse_conv_bn_eval(conv, norm))
        _replace(folded, norm_name, torch.nn.Identity())
    with torch.no_grad():
        expected, folded_output = trunk(examples[1]), folded(examples[1])
    tolerance = 1e-4 * max(float(expected.abs().max()), 1.0)
    if folded_output.shape != expected.shape or not torch.allclose(
            folded_output, expected, rtol=1e-3, atol=tolerance):
        _LOG.info('BatchNorm folding skipped: the folded trunk did not reproduce the original '
                  '(a convolution output read by more than its BatchNorm?); it runs unfolded')
        return trunk
    return folded


def _replace(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, attribute = name.rpartition('.')
    setattr(root.get_submodule(parent) if parent else root, attribute, module)


def _here(task: Callable[[], Any]) -> Any:
    return task()


class _StaticPath:
    """
    The buffers of one batch size: model input, probabilities, and their host copy.

    On CUDA (with graphs) the forward pass is captured once and replayed; elsewhere ``run``
    calls it eagerly on the same buffers. The buffers are made outside inference mode, as
    ordinary tensors, and every write to them happens inside it: an inference-mode tensor
    cannot be written outside inference mode, and ordinary ones can be written in both.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                 classes: int, *, capture: bool, warmup_iterations: int,
                 on_worker: Callable[[Callable[[], Any]], Any] = _here) -> None:
        self.forward = forward
        self.input = images
        self.output = torch.zeros(images.shape[0], classes, device=images.device)
        on_cuda = images.device.type == 'cuda'
        self.host_output = (torch.empty(self.output.shape, pin_memory=True) if on_cuda
                            else self.output)
        self.graph: torch.cuda.CUDAGraph | None = None
        # Warm-up and capture run where ``on_worker`` says: the node's inference thread,
        # between batches. torch.cuda.graph captures in 'global' mode: CUDA work of another
        # thread during the capture (a batch of the engine being replaced) makes it fail or
        # record the wrong thing, and entering it empties the allocator's cache.
        on_worker(functools.partial(self._prepare, capture, warmup_iterations))

    def _prepare(self, capture: bool, warmup_iterations: int) -> None:
        device = self.input.device
        with contextlib.ExitStack() as scope:
            scope.enter_context(torch.inference_mode())  # per thread: entered where it runs
            if capture:
                scope.enter_context(torch.cuda.device(device))
                side = torch.cuda.Stream(device=device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(max(warmup_iterations, 1)):  # capture needs warm kernels
                        self.output.copy_(self.forward(self.input))
                torch.cuda.current_stream(device).wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                # On a stream of this engine's device: torch's default capture stream is made
                # once per process, on the device that captured first (cuda:0, then cuda:1
                # after a device change, failed).
                with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(device=device)):
                    self.output.copy_(self.forward(self.input))
            else:
                for _ in range(max(warmup_iterations, 1)):
                    self.output.copy_(self.forward(self.input))

    def run(self) -> np.ndarray:
        """Run the model on ``input`` as it is now; return a copy of the probabilities."""
        with torch.inference_mode():
            if self.graph is not None:
                self.graph.replay()
            else:
                self.output.copy_(self.forward(self.input))
            if self.host_output is not self.output:
                self.host_output.copy_(self.output, non_blocking=True)
                torch.cuda.current_stream(self.output.device).synchronize()
        return self.host_output.numpy().copy()


class TorchEngine(EngineBase):
    """
    Runs a ``CnnRnnClassifier`` on camera frames with torch (the ``torch`` backend).

    Build it with ``from_checkpoint`` or ``from_config``; call ``infer`` with uint8 HxWxC
    frames of any size; call ``close`` (or use it as a context manager) to free the device.
    """

    def __init__(self, model: CnnRnnClassifier, *, labels: Sequence[str],
                 preprocessing: Preprocessing,
                 settings: EngineSettings = EngineSettings(),
                 on_worker: Callable[[Callable[[], Any]], Any] = _here) -> None:
        """
        Prepare the model for the device and warm it up; raises rather than half-build.

        ``on_worker(task)`` runs each batch size's buffer warm-up and CUDA-graph capture (the
        node: in its inference thread, between batches); by default they run here.
        """
        self._on_worker = on_worker
        if len(labels) != model.config.num_classes:
            raise ValueError(f'{len(labels)} labels for a model with '
                             f'{model.config.num_classes} classes')
        super().__init__(labels=labels, preprocessing=preprocessing, settings=settings)
        self.config: ModelConfig = model.config
        self.device = resolve_device(settings.device)
        self.dtype = resolve_precision(settings.precision, self.device)
        on_cuda = self.device.type == 'cuda'
        self._capture = on_cuda and settings.cuda_graphs
        self._use_static = (self._capture if settings.static_buffers is None
                            else settings.static_buffers)
        self._static: dict[int, _StaticPath] = {}
        self._unbuffered: set[int] = set()  # batch sizes whose buffers ran out of memory
        self._warm: set[int] = set()
        self._staging: dict[tuple, torch.Tensor] = {}  # pinned host buffers, by batch shape
        self.temporal = model.temporal is not None
        try:
            self._prepare(model)
            self.warmup()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike,
                        settings: EngineSettings = EngineSettings(), *,
                        on_worker: Callable[[Callable[[], Any]], Any] = _here) -> TorchEngine:
        """Load a checkpoint file and build an engine with its labels and preprocessing."""
        checkpoint = load_checkpoint(path)
        return cls(checkpoint.model, labels=checkpoint.labels,
                   preprocessing=checkpoint.preprocessing, settings=settings,
                   on_worker=on_worker)

    @classmethod
    def from_config(cls, config: ModelConfig, *, labels: Sequence[str] | None = None,
                    settings: EngineSettings = EngineSettings(), seed: int = 0,
                    on_worker: Callable[[Callable[[], Any]], Any] = _here) -> TorchEngine:
        """Build an untrained model (random or ``trunk_weights``) from a config."""
        with seeded(seed):
            model = CnnRnnClassifier(config)
        return cls(model, labels=list(labels or default_labels(config.num_classes)),
                   preprocessing=Preprocessing.for_config(config), settings=settings,
                   on_worker=on_worker)

    # -- preparation -------------------------------------------------------------------------

    def _prepare(self, model: CnnRnnClassifier) -> None:
        model = copy.deepcopy(model).eval()
        memory_format = (torch.channels_last if self.settings.channels_last
                         else torch.contiguous_format)
        trunk = fold_batch_norm(model.trunk, model.config.input_size).to(
            self.device, self.dtype, memory_format=memory_format)
        # The recurrent part stays float32; see the module docstring.
        model.trunk = torch.nn.Identity()
        self._model = model.to(self.device, torch.float32)
        self._model.rnn.flatten_parameters()
        self._trunk = trunk
        self._run_trunk = trunk
        if self.settings.compile_trunk:
            self._run_trunk = torch.compile(trunk, dynamic=False)
        self._offset, self._scale = normalisation(self.preprocessing, self.device)
        # One row per stream and a scratch row; made outside inference mode, like the static
        # buffers, so writes to it inside inference mode are allowed.
        self._state_table = torch.zeros(self.streams.capacity + 1, model.state_size,
                                        device=self.device)
        self._memory_format = (torch.channels_last if self.settings.channels_last
                               else torch.contiguous_format)

    def _device(self) -> contextlib.AbstractContextManager:
        """Make ``self.device`` the current CUDA device: streams and syncs of cuda:N use it."""
        if self.device.type == 'cuda':
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def _model_input(self, frames: list[np.ndarray], orders: list[str],
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """
        Return frames as the normalised model input [B, 3, H, W] on the device, in ``out``.

        One resize path per frame, whatever its batch: OpenCV on the CPU; torch bilinear on a
        GPU, one upload and one resize per group of frames sharing a shape and colour order.
        """
        if self.device.type != 'cuda':
            batch = torch.from_numpy(frames_to_uint8_batch(frames, orders, self.preprocessing))
            images = normalise_uint8_batch(batch, self._offset, self._scale, self.dtype)
            images = images.contiguous(memory_format=self._memory_format)
            if out is None:
                return images
            return out.copy_(images)
        if out is None:
            out = torch.empty((len(frames), 3, *self.preprocessing.input_size),
                              dtype=self.dtype, device=self.device
                              ).contiguous(memory_format=self._memory_format)
        groups: dict[tuple, list[int]] = {}
        for index, (frame, order) in enumerate(zip(frames, orders)):
            groups.setdefault((frame.shape, order), []).append(index)
        for (shape, order), indices in groups.items():
            # One pinned buffer per group of this batch: a group's upload may still be in
            # flight (non-blocking) while the next group is staged.
            staging = self._staging_buffer((len(indices), *shape), order)
            np.stack([frames[i] for i in indices], out=staging.numpy())
            uploaded = staging.to(self.device, non_blocking=True)
            images = frames_to_tensor_torch(uploaded, order, self.preprocessing, self._offset,
                                            self._scale, self.dtype)
            if len(indices) == len(frames):
                out.copy_(images)
            else:
                out[indices] = images
        return out

    def _staging_buffer(self, shape: tuple, order: str) -> torch.Tensor:
        """Return a pinned host buffer for a group of frames, reused: pinning costs ms."""
        key = (shape, order)
        buffer = self._staging.get(key)
        if buffer is None:
            if len(self._staging) >= 64:  # an unbounded mix of resolutions: start over
                torch.cuda.current_stream(self.device).synchronize()
                self._staging.clear()
            buffer = self._staging[key] = torch.empty(shape, dtype=torch.uint8,
                                                      pin_memory=True)
        return buffer

    def _forward(self, images: torch.Tensor, slots: torch.Tensor | None = None,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        """
        Model input [B, 3, H, W] to probabilities [B, classes], entirely on the device.

        A temporal model reads each frame's state row ``slots`` from the state table (zeroed
        where ``keep`` is 0: a fresh stream) and writes the new state back in place, so the
        state never leaves the device and a CUDA graph can capture the whole step.
        """
        model = self._model
        if model.temporal is None:
            with compile_scope():
                feature_map = self._run_trunk(images).float()
            vectors = model.pool(*model.encode(model.to_sequence(feature_map)))
            return torch.softmax(model.head(vectors), dim=1)
        state = self._state_table.index_select(0, slots) * keep.unsqueeze(1)
        with compile_scope():
            feature_map = self._run_trunk(model.trunk_input(images, state)).float()
        vectors = model.pool(*model.encode(model.to_sequence(feature_map)))
        logits, new_state = model.temporal_step(vectors, state, images)
        self._state_table.index_copy_(0, slots, new_state)
        return torch.softmax(logits, dim=1)

    def _out_of_memory(self, batch_size: int) -> None:
        # This batch size runs without static buffers from now on, so the next frames do not
        # try (and fail) to capture again; other sizes keep theirs.
        self._static.pop(batch_size, None)
        self._unbuffered.add(batch_size)
        torch.cuda.empty_cache()

    def _fall_back_to_eager(self, error: Exception) -> None:
        _LOG.warning('torch.compile failed (%s: %s); running the trunk eagerly',
                     type(error).__name__, str(error).splitlines()[0] if str(error) else '')
        self._run_trunk = self._trunk

    def _probabilities(self, frames: list[np.ndarray], orders: list[str],
                       slots: list[int], fresh: list[bool]) -> tuple[np.ndarray, float]:
        """Return probabilities [B, classes] and the time the input reached the device."""
        size = len(frames)
        # Each frame's state row, and 0 where its stream starts afresh (1 where it carries on).
        rows = (torch.tensor(slots), torch.tensor([0.0 if f else 1.0 for f in fresh])) \
            if self.temporal else None
        if self._use_static and size not in self._unbuffered:
            path = self._static.get(size) or self._make_static(size)
            with torch.inference_mode():
                self._model_input(frames, orders, out=path.input)
                if rows is not None:
                    path.slots.copy_(rows[0], non_blocking=True)
                    path.keep.copy_(rows[1], non_blocking=True)
            uploaded = time.perf_counter()
            return path.run(), uploaded
        slot_index, keep = (row.to(self.device) for row in rows) if rows else (None, None)
        with torch.inference_mode():
            images = self._model_input(frames, orders)
            uploaded = time.perf_counter()
            probabilities = self._run_compiled(images, slot_index, keep, size)
            result = probabilities.float().cpu().numpy()
        return result, uploaded

    def _run_compiled(self, images: torch.Tensor, slots: torch.Tensor | None,
                      keep: torch.Tensor | None, size: int) -> torch.Tensor:
        """Run the model; a compile failure on a new batch size falls back to eager once."""
        if size in self._warm or self._run_trunk is self._trunk:
            return self._forward(images, slots, keep)
        try:
            outputs = self._forward(images, slots, keep)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # inductor/triton failures have no common base class
            self._fall_back_to_eager(error)
            outputs = self._forward(images, slots, keep)
        self._warm.add(size)
        return outputs

    def _make_static(self, size: int) -> _StaticPath:
        images = torch.zeros((size, 3, *self.preprocessing.input_size), dtype=self.dtype,
                             device=self.device).contiguous(memory_format=self._memory_format)
        # Warm-up and capture run on the scratch row, which is always fresh.
        slots = torch.full((size,), self.streams.scratch_slot, device=self.device)
        keep = torch.zeros(size, device=self.device)
        with torch.inference_mode():
            # Compile (or fall back) before any capture: capture replays known kernels only.
            self._run_compiled(images, slots if self.temporal else None,
                               keep if self.temporal else None, size)
        if self.temporal:
            forward = lambda batch: self._forward(batch, slots, keep)  # noqa: E731
        else:
            forward = self._forward
        path = _StaticPath(forward, images, self.config.num_classes, capture=self._capture,
                           warmup_iterations=self.settings.warmup_iterations,
                           on_worker=self._on_worker)
        path.slots, path.keep = slots, keep
        self._static[size] = path
        return path

    # -- lifetime ----------------------------------------------------------------------------

    def describe(self) -> str:
        """Return a one-line summary for logs and diagnostics."""
        config = self.config
        words = [config.backbone, config.sequence, f'{config.rnn}({config.hidden_size})']
        words += ['bidirectional'] if config.bidirectional else []
        words += [config.pooling]
        words += [f'temporal-{config.temporal}'] if config.temporal else []
        words += [f'{config.input_size[0]}x{config.input_size[1]}', f'on {self.device}',
                  precision_name(self.dtype)]
        words += ['compiled'] if self._compiled else []
        if self._use_static:
            words.append('cuda-graphs' if self._capture else 'static-buffers')
        return ' '.join(words)

    @property
    def _compiled(self) -> bool:
        return getattr(self, '_run_trunk', None) is not getattr(self, '_trunk', None)

    def carry_state_from(self, other: EngineBase) -> bool:
        """
        Take over another engine's per-camera temporal state, if it is of the same model.

        For the swap from the eager engine to the compiled one of the same build: the cameras
        go on where they were instead of starting their memory afresh. The table is copied in
        place, since captured CUDA graphs hold it. Returns whether anything was carried.
        """
        if not (self.temporal and isinstance(other, TorchEngine) and other.temporal
                and other.config == self.config and hasattr(other, '_state_table')
                and other._state_table.shape == self._state_table.shape):
            return False
        self._state_table.copy_(other._state_table.to(self._state_table.device))
        self.streams = other.streams
        return True

    def close(self) -> None:
        """Release the model and every captured graph; GPU memory returns to the pool."""
        self._static.clear()
        self._staging.clear()
        for name in ('_model', '_trunk', '_run_trunk', '_offset', '_scale', '_state_table'):
            if hasattr(self, name):
                delattr(self, name)
        if getattr(self, 'device', None) is not None and self.device.type == 'cuda':
            torch.cuda.empty_cache()
