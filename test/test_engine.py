"""The inference engine: agreement with the float32 reference, inputs, errors, streams."""

from dataclasses import replace
import threading

from cnn_rnn_perception.core.checkpoint import save_checkpoint
from cnn_rnn_perception.core.engine import (
    EngineSettings, fold_batch_norm, resolve_device, resolve_precision, TorchEngine)
from cnn_rnn_perception.core.model import CnnRnnClassifier
from cnn_rnn_perception.core.model_config import ModelConfig, Preprocessing
from cnn_rnn_perception.core.preprocess import (
    frames_to_array_cpu, frames_to_tensor_torch, normalisation)
import cv2
import numpy as np
import pytest
import torch

CONFIG = ModelConfig(backbone='resnet18', input_size=(96, 128), hidden_size=32, num_classes=5)
LABELS = ['corridor', 'open_space', 'doorway_left', 'doorway_right', 'blocked']
EAGER_CPU = EngineSettings(device='cpu', compile_trunk=False, warmup_iterations=1)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def model(config: ModelConfig = CONFIG) -> CnnRnnClassifier:
    torch.manual_seed(0)
    return CnnRnnClassifier(config).eval()


def engine(settings: EngineSettings = EAGER_CPU, **kwargs) -> TorchEngine:
    return TorchEngine(model(), labels=LABELS,
                       preprocessing=Preprocessing.for_config(CONFIG), settings=settings,
                       **kwargs)


def camera_frames(count: int = 3, shape=(480, 640, 3), seed: int = 0) -> list[np.ndarray]:
    """Smooth images with structure (gradients and a box), not white noise."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        y, x = np.mgrid[0:shape[0], 0:shape[1]]
        frame = np.stack([(x * rng.uniform(0.1, 0.5)) % 256, (y * rng.uniform(0.1, 0.5)) % 256,
                          np.full_like(x, rng.integers(0, 256))], axis=-1).astype(np.uint8)
        top, left = rng.integers(0, shape[0] // 2), rng.integers(0, shape[1] // 2)
        frame[top:top + shape[0] // 3, left:left + shape[1] // 3] = rng.integers(0, 256, 3)
        frames.append(np.ascontiguousarray(frame[..., :shape[2]]))
    return frames


def reference_probabilities(frames, color_order='bgr') -> np.ndarray:
    """Classify the seed's way: OpenCV on the host, numpy normalisation, fp32 eager."""
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    inputs = []
    for frame in frames:
        resized = cv2.resize(frame, (CONFIG.input_size[1], CONFIG.input_size[0]))
        rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB) if color_order == 'bgr' else resized
        inputs.append(((rgb.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))
    with torch.no_grad():
        logits = model()(torch.from_numpy(np.stack(inputs)))
    return torch.softmax(logits, dim=1).numpy()


def test_fp32_cpu_engine_matches_the_seed_style_reference():
    frames = camera_frames()
    results = engine().infer(frames, color_order='bgr')
    probabilities = np.stack([result.probabilities for result in results])
    np.testing.assert_allclose(probabilities, reference_probabilities(frames), atol=1e-5)
    for result in results:
        assert result.label == LABELS[int(np.argmax(result.probabilities))]
        assert abs(result.probabilities.sum() - 1.0) < 1e-5


def centred_log(probabilities: np.ndarray) -> np.ndarray:
    """Logits up to the per-row constant softmax drops."""
    logs = np.log(probabilities)
    return logs - logs.mean(axis=1, keepdims=True)


def relative_error(values: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(values - reference) / np.linalg.norm(reference))


def test_bf16_cpu_engine_agrees_with_the_fp32_reference():
    frames = camera_frames(4)
    bf16 = engine(EngineSettings(device='cpu', precision='bf16', compile_trunk=False))
    probabilities = np.stack([r.probabilities for r in bf16.infer(frames)])
    reference = reference_probabilities(frames)
    assert relative_error(centred_log(probabilities), centred_log(reference)) < 2e-2


def test_device_preprocessing_matches_the_opencv_path():
    """The GPU resizes with torch; on the CPU both paths must give the same tensor."""
    frames = camera_frames(2)
    preprocessing = Preprocessing.for_config(CONFIG)
    host = torch.from_numpy(frames_to_array_cpu(frames, ['bgr', 'bgr'], preprocessing))
    offset, scale = normalisation(preprocessing)
    device = frames_to_tensor_torch(torch.from_numpy(np.stack(frames)), 'bgr', preprocessing,
                                    offset, scale)
    assert device.shape == host.shape == (2, 3, 96, 128)
    assert device.is_contiguous(memory_format=torch.channels_last)
    # OpenCV rounds its resized pixels to uint8; one grey level is 1/(255*0.225) = 0.017 here.
    assert (device - host).abs().max() < 0.04
    assert (device - host).abs().mean() < 0.01


def test_colour_orders_grey_and_alpha_frames_give_consistent_results():
    tested = engine()
    bgr = camera_frames(1)[0]
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    from_bgr, from_rgb, from_rgba, from_grey, from_grey3 = tested.infer(
        [bgr, rgb, rgba, grey, np.dstack([grey] * 3)],
        color_order=['bgr', 'rgb', 'rgb', 'rgb', 'rgb'])
    np.testing.assert_allclose(from_bgr.probabilities, from_rgb.probabilities, atol=1e-6)
    np.testing.assert_allclose(from_rgba.probabilities, from_rgb.probabilities, atol=1e-6)
    np.testing.assert_allclose(from_grey.probabilities, from_grey3.probabilities, atol=1e-6)


@pytest.mark.parametrize('frame,message', [
    (np.zeros((48, 64, 3), np.float32), 'expected a uint8 frame; got dtype float32'),
    (np.zeros((2, 48, 64, 3), np.uint8), 'got shape (2, 48, 64, 3)'),
    (np.zeros((48, 64, 2), np.uint8), 'got shape (48, 64, 2)'),
    (np.zeros((0, 64, 3), np.uint8), 'frame has zero size'),
    ([[0, 1], [2, 3]], 'expected a numpy uint8 HxWx3 frame; got list'),
])
def test_bad_frames_raise_value_errors_naming_what_was_expected(frame, message):
    with pytest.raises(ValueError) as error:
        engine().infer([frame])
    assert message in str(error.value)


def test_bad_settings_raise_value_errors():
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        EngineSettings(device='tpu')
    with pytest.raises(ValueError, match='precision must be one of auto, fp32, fp16, bf16'):
        EngineSettings(precision='fp8')
    with pytest.raises(ValueError, match='fp16 is for GPUs'):
        resolve_precision('fp16', torch.device('cpu'))
    with pytest.raises(ValueError, match='max_batch must be >= 1'):
        EngineSettings(max_batch=0)
    with pytest.raises(ValueError, match='top_k must be >= 1'):
        engine().infer(camera_frames(1), top_k=0)
    with pytest.raises(ValueError, match='color_order must be one of rgb, bgr'):
        engine().infer(camera_frames(1), color_order='yuv')
    with pytest.raises(ValueError, match='4 labels for a model with 5 classes'):
        TorchEngine(model(), labels=LABELS[:4],
                    preprocessing=Preprocessing.for_config(CONFIG), settings=EAGER_CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the no-GPU fallback')
def test_without_a_gpu_auto_falls_back_to_cpu_and_cuda_is_refused(caplog):
    assert resolve_device('auto') == torch.device('cpu')
    assert 'no CUDA device is available, running on the CPU' in caplog.text
    assert resolve_precision('auto', torch.device('cpu')) == torch.float32
    with pytest.raises(ValueError, match="device 'cuda' requested but torch sees no CUDA"):
        resolve_device('cuda')


def test_frames_of_several_cameras_batch_into_one_pass_with_the_same_results():
    frames = camera_frames(5)
    sizes = [(480, 640, 3), (240, 320, 3)]
    frames += [camera_frames(1, shape)[0] for shape in sizes]
    tested = engine(EngineSettings(device='cpu', compile_trunk=False, max_batch=4))
    batched = tested.infer(frames)
    one_by_one = [tested.infer([frame])[0] for frame in frames]
    assert [r.times.batch_size for r in batched] == [4] * 4 + [3] * 3
    for together, alone in zip(batched, one_by_one):
        np.testing.assert_allclose(together.probabilities, alone.probabilities, atol=1e-5)


def test_results_carry_sorted_top_k_labels_and_stage_times():
    result = engine().infer(camera_frames(1), top_k=3)[0]
    scores = [score for _, score in result.top_k]
    assert len(result.top_k) == 3 and scores == sorted(scores, reverse=True)
    assert {label for label, _ in result.top_k} <= set(LABELS)
    assert result.times.preprocess_ms > 0 and result.times.forward_ms > 0
    assert result.times.total_ms == pytest.approx(
        result.times.preprocess_ms + result.times.forward_ms + result.times.postprocess_ms)


TEMPORAL = replace(CONFIG, temporal='gru', temporal_hidden_size=16)


def temporal_engine(settings: EngineSettings = EAGER_CPU) -> TorchEngine:
    torch.manual_seed(0)
    return TorchEngine(CnnRnnClassifier(TEMPORAL).eval(), labels=LABELS,
                       preprocessing=Preprocessing.for_config(TEMPORAL), settings=settings)


def stream_of(tested, frames, stream='a', start=0.0, period=0.1):
    """Classify frames one call each, as a camera would send them; return probabilities."""
    return [tested.infer([frame], streams=[stream], stamps=[start + period * index])[0]
            .probabilities for index, frame in enumerate(frames)]


@pytest.mark.parametrize('static', [False, True], ids=['eager', 'static-buffers'])
def test_a_streams_state_is_unaffected_by_other_cameras_in_its_batches(static):
    frames = camera_frames(6)
    settings = replace(EAGER_CPU, static_buffers=static)
    alone = stream_of(temporal_engine(settings), frames)
    crowded = temporal_engine(settings)
    mixed = []
    for index, frame in enumerate(frames):
        # Another camera in every batch, first or second, and a third that comes and goes.
        others = [frames[-1 - index]] + ([frames[0]] if index % 2 else [])
        names = ['b'] + (['c'] if index % 2 else [])
        batch, streams = ([frame] + others, ['a'] + names) if index % 3 else (
            others + [frame], names + ['a'])
        results = crowded.infer(batch, streams=streams, stamps=[0.1 * index] * len(batch))
        mixed.append(results[streams.index('a')].probabilities)
    np.testing.assert_allclose(mixed, alone, atol=1e-5)
    assert not np.allclose(alone[0], alone[3], atol=1e-4)  # the state does change the output


def test_state_resets_on_a_gap_on_stamps_going_backwards_and_on_request():
    frames = camera_frames(4)
    tested = temporal_engine()
    first = stream_of(tested, frames)
    status = tested.stream_status()['a']
    assert status.frames == 4 and status.age_s == pytest.approx(0.3)
    # Within reset_after_s (1 s): carried, so the same frames read differently.
    carried = stream_of(tested, frames, start=1.0)
    assert not np.allclose(carried[0], first[0], atol=1e-4)
    for start, reason in ((3.0, 'gap of 1.700 s'), (0.0, 'stamps went backwards')):
        again = stream_of(tested, frames, start=start)
        np.testing.assert_allclose(again, first, atol=1e-5)
        assert tested.stream_status()['a'].reason.startswith(reason)
    tested.reset_streams('a')
    np.testing.assert_allclose(stream_of(tested, frames, start=5.0), first, atol=1e-5)
    tested.streams.set_reset_after(0.05)  # live: every 0.1 s gap now resets
    each_fresh = stream_of(tested, frames, start=6.0)
    unnamed = [tested.infer([frame])[0].probabilities for frame in frames]  # always fresh
    np.testing.assert_allclose(each_fresh, unnamed, atol=1e-5)
    assert tested.stream_status()['a'].frames == 1


def test_a_streams_frames_in_one_call_run_in_order_and_a_per_frame_model_ignores_streams():
    frames = camera_frames(3)
    alone = stream_of(temporal_engine(), frames)
    together = temporal_engine().infer(frames, streams=['a'] * 3, stamps=[0.0, 0.1, 0.2])
    np.testing.assert_allclose([r.probabilities for r in together], alone, atol=1e-5)
    plain = engine()
    assert plain.stream_status() == {}
    np.testing.assert_allclose(stream_of(plain, frames), stream_of(plain, frames), atol=1e-6)


def test_engine_from_checkpoint_uses_its_labels_and_preprocessing(tmp_path):
    path = tmp_path / 'model.pt'
    save_checkpoint(path, model(), labels=LABELS,
                    preprocessing=Preprocessing(input_size=CONFIG.input_size, color_order='bgr'))
    tested = TorchEngine.from_checkpoint(path, EAGER_CPU)
    assert tested.labels == LABELS and tested.preprocessing.color_order == 'bgr'
    frame = camera_frames(1)[0]
    # A bgr-trained model fed a bgr frame sees the same values as the rgb reference fed rgb.
    np.testing.assert_allclose(tested.infer([frame], color_order='bgr')[0].probabilities,
                               reference_probabilities([frame[..., ::-1].copy()], 'bgr')[0],
                               atol=1e-5)


def test_close_releases_the_model():
    tested = engine()
    tested.close()
    assert not hasattr(tested, '_model')


@pytest.mark.slow
def test_compiled_cpu_engine_matches_eager():
    frames = camera_frames(2)
    compiled = engine(EngineSettings(device='cpu', compile_trunk=True))
    assert 'compiled' in compiled.describe()
    probabilities = np.stack([r.probabilities for r in compiled.infer(frames)])
    np.testing.assert_allclose(probabilities, reference_probabilities(frames), atol=1e-4)


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize('precision', ['fp32', 'bf16', 'fp16'])
def test_cuda_engine_agrees_with_the_cpu_reference(precision):
    frames = camera_frames(3)
    gpu = engine(EngineSettings(device='cuda', precision=precision))
    probabilities = np.stack([r.probabilities for r in gpu.infer(frames)])
    reference = reference_probabilities(frames)
    limit = 2e-3 if precision == 'fp32' else 2e-2
    assert relative_error(centred_log(probabilities), centred_log(reference)) < limit
    # A new batch size is captured afresh and gives the same answers.
    single = gpu.infer(frames[:1])[0].probabilities
    np.testing.assert_allclose(single, probabilities[0], atol=1e-3)
    gpu.close()


def test_an_engine_leaves_the_process_torch_state_as_it_found_it():
    """Training after inference in one process must compute what it would have without it."""
    from torch import _dynamo, _inductor
    limit = 'recompile_limit' if hasattr(_dynamo.config, 'recompile_limit') \
        else 'cache_size_limit'
    before = (_inductor.config.freezing, getattr(_dynamo.config, limit),
              torch.get_num_threads(), torch.random.get_rng_state())
    with TorchEngine.from_config(
            CONFIG, labels=LABELS, settings=EngineSettings(device='cpu', warmup_iterations=1),
            seed=7) as compiled:
        compiled.infer(camera_frames(2), color_order='bgr')
    after = (_inductor.config.freezing, getattr(_dynamo.config, limit),
             torch.get_num_threads(), torch.random.get_rng_state())
    assert before[:3] == after[:3]
    assert torch.equal(before[3], after[3]), 'the engine reseeded the global generator'


def trained_looking(module: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm statistics far from identity, as training would."""
    generator = torch.Generator().manual_seed(3)
    for norm in module.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            for tensor, low, high in ((norm.running_mean, -1, 1), (norm.running_var, 0.5, 2),
                                      (norm.weight.data, 0.5, 1.5), (norm.bias.data, -.5, .5)):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return module.eval()


def batch_norms(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())


@pytest.mark.parametrize('backbone', ['resnet18', 'mobilenet_v3_small'])
def test_folding_removes_every_batch_norm_and_keeps_the_trunks_output(backbone):
    trunk = trained_looking(CnnRnnClassifier(ModelConfig(backbone=backbone)).trunk)
    folded = fold_batch_norm(trunk, (96, 128))
    images = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        expected, got = trunk(images), folded(images)
    assert batch_norms(trunk) > 0 and batch_norms(folded) == 0
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


class ReusedOutput(torch.nn.Module):
    """A convolution whose output its BatchNorm reads, and so does a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)

    def forward(self, images):
        features = self.conv(images)
        return self.norm(features) + features


def test_a_batch_norm_that_cannot_be_folded_is_left_and_the_output_kept():
    in_place_between = trained_looking(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.BatchNorm2d(4)))
    for trunk in (in_place_between, trained_looking(ReusedOutput())):
        folded = fold_batch_norm(trunk, (32, 32))
        images = torch.rand(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(folded(images), trunk(images), atol=1e-5)
        assert batch_norms(folded) == 1


class Witness(torch.nn.Module):
    """Records, in a list no copy of it duplicates, whether ``nn.Module.__call__`` is torch's."""

    original_call = torch.nn.Module.__call__

    def __init__(self, seen: list[bool]) -> None:
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
        self.record = seen.append

    def forward(self, images):
        self.record(torch.nn.Module.__call__ is Witness.original_call)
        return self.norm(self.conv(images))


def test_folding_changes_nothing_another_thread_could_see():
    """
    torch.fx tracing patches ``nn.Module.__call__`` process-wide while it runs.

    The node builds its next engine (folding included) while the current one serves: a model
    called in the serving thread during a trace was traced instead and failed (CI, once).
    """
    seen = []
    folded = fold_batch_norm(Witness(seen), (32, 32))
    assert seen and all(seen)
    assert batch_norms(folded) == 0


def test_from_config_builds_the_same_model_for_the_same_seed():
    frames = camera_frames(2)
    first, second = (TorchEngine.from_config(CONFIG, labels=LABELS, settings=EAGER_CPU,
                                             seed=3) for _ in range(2))
    np.testing.assert_array_equal(first.infer(frames)[0].probabilities,
                                  second.infer(frames)[0].probabilities)


# -- the GPU path's structure, exercised on the CPU ------------------------------------------

STATIC_CPU = EngineSettings(device='cpu', compile_trunk=False, static_buffers=True,
                            warmup_iterations=1, max_batch=4)


def test_static_buffers_run_on_the_cpu_and_agree_with_eager_across_replays():
    """The captured path's buffer code, with the graph replay replaced by an eager call."""
    static = engine(STATIC_CPU)
    assert 'static-buffers' in static.describe()
    for seed in range(3):  # each call refills the same buffers: no stale input or output
        frames = camera_frames(2, seed=seed)
        got = np.stack([r.probabilities for r in static.infer(frames)])
        np.testing.assert_allclose(got, reference_probabilities(frames), atol=1e-5)
    assert set(static._static) == {1, 2}


def test_a_frame_gets_the_same_answer_alone_or_batched_with_another_resolution():
    front = camera_frames(1, shape=(480, 640, 3), seed=1)[0]
    side = camera_frames(1, shape=(240, 320, 4), seed=2)[0]
    for settings in (EAGER_CPU, STATIC_CPU):
        tested = engine(settings)
        alone = tested.infer([front], color_order='bgr')[0].probabilities
        mixed = tested.infer([front, side], color_order=['bgr', 'rgb'])
        np.testing.assert_allclose(mixed[0].probabilities, alone, atol=1e-6)
        assert not np.allclose(mixed[1].probabilities, alone)


@pytest.mark.slow
def test_after_warm_up_no_resolution_or_colour_order_compiles_again():
    from torch._dynamo.utils import counters
    compiled = engine(EngineSettings(device='cpu', compile_trunk=True, static_buffers=True,
                                     warmup_iterations=1, max_batch=3))
    compiled.warmup(batch_sizes=[1, 2, 3])
    graphs = counters['stats']['unique_graphs']
    frames = [camera_frames(1, shape=shape, seed=i)[0] for i, shape in
              enumerate([(480, 640, 3), (120, 160, 1), (720, 1280, 4)])]
    for count in (1, 2, 3):
        compiled.infer(frames[:count], color_order=['rgb', 'bgr', 'bgr'][:count])
    assert counters['stats']['unique_graphs'] == graphs, 'a shape compiled after warm-up'


def test_warming_up_beyond_max_batch_is_refused():
    with pytest.raises(ValueError, match='max_batch is 4'):
        engine(STATIC_CPU).warmup(batch_sizes=[5])


@CUDA
@pytest.mark.gpu
def test_cuda_graphs_replay_and_survive_mixed_batches():
    gpu = engine(EngineSettings(device='cuda', precision='fp32', max_batch=3))
    assert 'cuda-graphs' in gpu.describe()
    gpu.warmup(batch_sizes=[1, 2, 3])
    captured = dict(gpu._static)
    frames = camera_frames(3, seed=4)
    for _ in range(3):  # replays after capture: the inference-tensor bug died here
        got = np.stack([r.probabilities for r in gpu.infer(frames)])
    mixed = gpu.infer([frames[0], camera_frames(1, shape=(240, 320, 1))[0]],
                      color_order=['bgr', 'rgb'])
    np.testing.assert_allclose(mixed[0].probabilities, got[0], atol=1e-4)
    assert gpu._static == captured, 'a batch captured a graph after warm-up'
    reference = reference_probabilities(frames)
    assert relative_error(centred_log(got), centred_log(reference)) < 2e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two CUDA devices')
@pytest.mark.gpu
def test_an_engine_on_the_second_gpu_runs_there():
    gpu = engine(EngineSettings(device='cuda:1', precision='fp32'))
    frames = camera_frames(2)
    got = np.stack([r.probabilities for r in gpu.infer(frames)])
    assert torch.cuda.current_device() == 0
    assert relative_error(centred_log(got), centred_log(reference_probabilities(frames))) < 2e-3


def test_a_failed_batch_leaves_no_other_cameras_state_behind(monkeypatch):
    frames = camera_frames(4)
    # One state row: camera b takes camera a's row. Its first pass fails (a recoverable CUDA
    # out-of-memory, say), so that row still holds a's state when b's next frame reads it.
    tested = temporal_engine(replace(EAGER_CPU, max_streams=1))
    stream_of(tested, frames[:3], stream='a')
    working = tested._probabilities
    monkeypatch.setattr(tested, '_probabilities', lambda *args: (_ for _ in ()).throw(
        RuntimeError('the device failed this batch')))
    with pytest.raises(RuntimeError, match='failed this batch'):
        tested.infer([frames[3]], streams=['b'], stamps=[0.0])
    monkeypatch.setattr(tested, '_probabilities', working)
    after_failure = tested.infer([frames[3]], streams=['b'], stamps=[0.1])[0].probabilities
    fresh = temporal_engine(replace(EAGER_CPU, max_streams=1))
    np.testing.assert_allclose(after_failure,
                               fresh.infer([frames[3]], streams=['b'], stamps=[0.1])[0]
                               .probabilities, atol=1e-6)


def test_more_cameras_in_one_call_than_state_rows_never_share_a_row():
    frames = camera_frames(3)
    tested = temporal_engine(replace(EAGER_CPU, max_streams=2))
    with pytest.raises(ValueError, match='state table has 2 rows'):
        tested.streams.admit(['a', 'b', 'c'], [0.0, 0.0, 0.0])
    first = tested.infer(frames, streams=['a', 'b', 'c'], stamps=[0.0] * 3)
    second = tested.infer(frames, streams=['a', 'b', 'c'], stamps=[0.1] * 3)
    # Each stream's second frame is its own continuation or a fresh start, never another's.
    for index, stream in enumerate('abc'):
        alone = temporal_engine()
        own = stream_of(alone, [frames[index]] * 2, stream=stream)
        assert (np.allclose(second[index].probabilities, own[1], atol=1e-5)
                or np.allclose(second[index].probabilities, first[index].probabilities,
                               atol=1e-5)), stream
    slots = [status.slot for status in tested.streams.status().values()]
    assert len(slots) == len(set(slots)) == 2


def test_buffers_are_prepared_and_captured_where_on_worker_runs_them():
    from concurrent.futures import ThreadPoolExecutor
    frames = camera_frames(2)
    worker = ThreadPoolExecutor(1, thread_name_prefix='inference')
    ran_in = []

    def on_worker(task):  # the node's: the task runs in its inference thread, between batches
        def run():
            ran_in.append(threading.current_thread().name)
            return task()
        return worker.submit(run).result()

    settings = replace(EAGER_CPU, static_buffers=True, max_batch=2)
    torch.manual_seed(0)
    model = CnnRnnClassifier(CONFIG).eval()
    tested = TorchEngine(model, labels=LABELS, preprocessing=Preprocessing.for_config(CONFIG),
                         settings=settings, on_worker=on_worker)
    tested.warmup(batch_sizes=[2])
    worker.shutdown()
    # One preparation per batch size (1 at construction, 2 here), each in the worker thread.
    assert len(ran_in) == 2 and all(name.startswith('inference') for name in ran_in)
    reference = TorchEngine(model, labels=LABELS, preprocessing=Preprocessing.for_config(CONFIG),
                            settings=EAGER_CPU)
    np.testing.assert_allclose([r.probabilities for r in tested.infer(frames)],
                               [r.probabilities for r in reference.infer(frames)], atol=1e-5)
