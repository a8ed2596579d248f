"""The weight fingerprint at scale (issue 12): computed where the weights are from a fixed sample, no full
copy of the model; the same for float32, bfloat16 and float64 loads of a checkpoint (and for every load of
a float16- or bfloat16-stored one); another for another checkpoint, a fused LoRA or other loaded weights;
and ``cachec run`` / ``cachec eval`` take ``--device`` / ``--dtype``, so a plan calibrated in float32 runs
on the bfloat16 model without ``--force``."""

import copy

import pytest
import torch
from click.testing import CliRunner

from cachec.cli import main
from cachec.runtime import apply
from cachec.runtime.fingerprint import RUN, SAMPLES, STRIDE, WeightWatch, weights_fingerprint
from cachec.runtime.handle import PlanMismatchError

pytestmark = pytest.mark.filterwarnings("ignore:There are modules in DiTTransformer2DModel")


class Net(torch.nn.Module):
    """Big enough for the sample to be a small part of a tensor (1024 x 1024 weight), with a bias, a buffer and an
    integer buffer."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.big = torch.nn.Linear(1024, 1024)
        self.small = torch.nn.Linear(1024, 16)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        self.register_buffer("scale", torch.randn(16, generator=g))
        self.register_buffer("ids", torch.arange(7))


def _cast(model, dtype):
    """``model`` with its floating-point tensors cast to ``dtype`` (round to nearest even), a copy."""
    return copy.deepcopy(model).to(dtype)


def _sampled_flat_indices(n):
    runs = SAMPLES // RUN
    return {RUN * ((j * STRIDE) % (n // RUN)) + i for j in range(runs) for i in range(RUN)}


def test_float32_bfloat16_float64_loads_and_memory_layouts_agree():
    net = Net()
    fp = weights_fingerprint(net)
    assert fp.startswith("sha256:") and len(fp) == 71
    assert weights_fingerprint(_cast(net, torch.bfloat16)) == fp
    assert weights_fingerprint(_cast(net, torch.float64)) == fp
    t = copy.deepcopy(net)
    with torch.no_grad():  # the same values in transposed storage: a non-contiguous parameter
        t.big.weight = torch.nn.Parameter(net.big.weight.detach().t().contiguous().t())
    assert not t.big.weight.is_contiguous() and weights_fingerprint(t) == fp
    # documented non-invariance: float16 rounding of float32 weights moves ~1 value in 16 to the other bfloat16
    assert weights_fingerprint(_cast(net, torch.float16)) != fp


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_every_load_of_a_16_bit_checkpoint_agrees(stored):
    net = Net()
    with torch.no_grad():  # a checkpoint stored in 16 bits, including values in float16's subnormal range
        net.big.weight[0, :64] = torch.logspace(-9, -4, 64)
    ckpt = _cast(net, stored)
    fps = {dtype: weights_fingerprint(_cast(ckpt, dtype))
           for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}
    assert len(set(fps.values())) == 1, fps


def test_float16_double_rounding_happens_to_about_one_value_in_16():
    """The measurement behind the docstring: float32 → float16 → bfloat16 vs float32 → bfloat16."""
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02
    x = x[x.abs() >= 2.0 ** -14]
    frac = float((x.to(torch.bfloat16) != x.to(torch.float16).to(torch.bfloat16)).double().mean())
    assert 0.055 < frac < 0.07, frac


def test_a_dense_relative_edit_moves_about_150_eps_of_the_bfloat16_roundings():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1 << 20, generator=g) * 0.02
    eps = 1e-4
    moved = float((x.to(torch.bfloat16) != (x * (1 + eps * torch.randn(x.shape, generator=g))).to(torch.bfloat16))
                  .double().mean())
    assert 120 * eps < moved < 180 * eps, moved / eps


def test_other_checkpoint_fused_lora_and_load_state_dict_change_it():
    net = Net()
    fp = weights_fingerprint(net)
    assert weights_fingerprint(Net(seed=1)) != fp  # another checkpoint
    lora = copy.deepcopy(net)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 1024, generator=g) * 0.01, torch.randn(1024, 4, generator=g) * 0.01
    lora.big.weight.data += 0.5 * b @ a  # a rank-4 LoRA fused on one layer through .data
    assert weights_fingerprint(lora) != fp
    other = copy.deepcopy(net)
    other.load_state_dict(Net(seed=3).state_dict())
    assert weights_fingerprint(other) != fp
    other.load_state_dict(net.state_dict())
    assert weights_fingerprint(other) == fp
    renamed = copy.deepcopy(net)
    renamed.register_buffer("extra", torch.zeros(3))
    assert weights_fingerprint(renamed) != fp
    ints = copy.deepcopy(net)
    ints.ids[3] = 9
    assert weights_fingerprint(ints) != fp


def test_what_it_cannot_see_a_single_element_outside_the_sample():
    net = Net()
    fp = weights_fingerprint(net)
    n = net.big.weight.numel()
    sampled = _sampled_flat_indices(n)
    assert len(sampled) == SAMPLES  # distinct indices
    inside = min(sampled)
    outside = next(i for i in range(n) if i not in sampled)
    w = net.big.weight.data.view(-1)
    w[outside] += 1.0
    assert weights_fingerprint(net) == fp  # documented: outside the sample, unseen
    w[inside] += 1.0
    assert weights_fingerprint(net) != fp


def test_no_full_copy_of_any_tensor_is_made():
    from torch.utils._python_dispatch import TorchDispatchMode

    net = Net()
    owned = {t.untyped_storage().data_ptr() for t in net.state_dict().values()}
    biggest = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in owned:
                    biggest.append(o.untyped_storage().nbytes())
            return out

    with Record():
        weights_fingerprint(net)
    weight_bytes = net.big.weight.numel() * 4
    assert biggest and max(biggest) <= 4 * 3 * SAMPLES + 4096 < weight_bytes // 50, max(biggest)


def test_weight_watch_compares_sampled_bits_and_survives_a_dtype_change():
    net = Net()
    watch = WeightWatch(net)
    assert not watch.changed()
    net.big.weight.data[0, 0] = -net.big.weight.data[0, 0]  # probe 0 of the weight, through .data
    assert watch.changed()
    watch.refresh()
    assert not watch.changed()
    net.to(torch.bfloat16)
    assert watch.changed()


def test_meta_weights_are_refused():
    with torch.device("meta"):
        m = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta device"):
        weights_fingerprint(m)


# ------------------------------------------------------------------------------------ plans across dtypes


def test_a_float32_plan_applies_to_the_bfloat16_model_and_to_a_later_cast(tiny_digits):
    from cachec.runtime import full_plan, with_actions

    base = full_plan(tiny_digits, steps=4)
    plan = with_actions(base, {"transformer_blocks.0.attn1": "CC.C"})
    model = tiny_digits.transformer
    original = copy.deepcopy(model.state_dict())
    try:
        model.to(torch.bfloat16)
        with apply(tiny_digits, plan) as handle:  # no force needed
            images = tiny_digits.generate([3, 7], [0, 1], steps=4)
            assert handle.report.complete and handle.report.skipped == 1 and torch.isfinite(images).all()
            model.to(torch.float32)  # changes after apply(): the watch notices, the fingerprint still matches
            model.load_state_dict(original)  # the float32 weights again
            tiny_digits.generate([3, 7], [0, 1], steps=4)
            model.to(torch.float16)  # a float16 load of float32 weights: its own fingerprint, and the error says so
            with pytest.raises(PlanMismatchError, match="float16 load of a float32 checkpoint"):
                tiny_digits.generate([3, 7], [0, 1], steps=4)
    finally:
        model.to(torch.float32)
        model.load_state_dict(original)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from conftest import build_tiny_digits_folder

    return build_tiny_digits_folder(tmp_path_factory.mktemp("fp_digits"))


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_plan_calibrated_in_float32_runs_and_evaluates_in_bfloat16(tiny_dir, tmp_path):
    calib, plan = tmp_path / "calib.safetensors", tmp_path / "p.yaml"
    code, out = _cli("calibrate", "run", tiny_dir, "--classes", "0-1", "--steps", "4", "--samples-per-condition", "1",
                     "--sensitivity", "none", "--dtype", "float32", "-o", calib)
    assert code == 0, out
    code, out = _cli("plan", calib, "--method", "fora", "--interval", "2", "-o", plan)  # no EOC sidecar needed
    assert code == 0, out
    code, out = _cli("run", plan, tiny_dir, "--classes", "1", "--device", "cpu", "--dtype", "bfloat16",
                     "--out", tmp_path / "c.png")
    assert code == 0 and "skipped" in out and "skipped 0 " not in out, out
    code, out = _cli("eval", plan, tiny_dir, "--samples", "2", "--dtype", "bf16", "--json", tmp_path / "e.json")
    assert code == 0 and "PSNR" in out, out


@pytest.mark.parametrize("command", ["run", "eval"])
def test_cli_device_and_dtype_errors_are_one_line(tiny_dir, tmp_path, command):
    from cachec.runtime import full_plan, write_plan
    from cachec.loading import load_model

    plan = tmp_path / "p.yaml"
    write_plan(full_plan(load_model(tiny_dir), steps=2), plan)
    extra = ["--out", tmp_path / "c.png"] if command == "run" else []
    cases = [(["--dtype", "int8"], ("unsupported --dtype", "bfloat16")),
             (["--device", "gpu"], ("not a torch device", "cuda"))]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], ("--device cuda", "--device cpu")))
    for args, needles in cases:
        code, out = _cli(command, plan, tiny_dir, *args, *extra)
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        assert code != 0 and len(lines) == 1 and lines[0].startswith("Error:"), out
        for n in needles:
            assert n in lines[0], (n, out)
