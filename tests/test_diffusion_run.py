"""`kdkit diffusion ...` end to end on CPU: run folders, exact resume, clear errors, teacher training, the image
path (U-Net teacher on real CIFAR-10 -> DMD2 with guidance and a GAN head -> FD on kdkit classifier features),
and the fast step (compiled == eager on CPU; CUDA graph == eager on a GPU)."""
import json
import os

import pytest
import torch

from kdkit.cli import main
from kdkit.errors import ConfigError, KdkitError, ShapeMismatchError, UnknownNameError

TINY = ["width=32", "depth=2", "batch_size=32", "eval_samples=500", "teacher_steps=8", "threads=1", "progress=false"]
# the 2-D recipes warm the generator up by regression onto teacher ODE samples (6,000 steps): a few here
WARM = {"dmd2": ["warmup_steps=20", "warmup_pairs=256", "warmup_teacher_steps=4"],
        "sid": ["warmup_steps=20", "warmup_pairs=256", "warmup_teacher_steps=4"],
        "cd": ["warmup_steps=20", "warmup_pairs=256", "warmup_substeps=1"], "rectflow": []}


def test_dmd2_cli_run_folder(tmp_path, capsys):
    rc = main(["diffusion", "dmd2", "steps=6", "eval_every=3", "sample_every=2", "save_every=3", "log_every=2",
               f"output_dir={tmp_path}", "name=r", "fake_steps=2", "gan=true", *TINY, *WARM["dmd2"]])
    assert rc == 0
    run = tmp_path / "r"
    cfg = (run / "config.yaml").read_text()
    # method option + the 2-D preset, resolved
    assert "fake_steps: 2" in cfg and "lr_generator: 0.0001" in cfg and "regression_loss: huber" in cfg
    m = json.loads((run / "metrics.json").read_text())
    assert [e["step"] for e in m["evals"]] == [3, 6]
    assert {"sw2", "sw2_x_teacher", "off_mode_pct", "mode_coverage", "modes_covered", "mmd", "mode_mass",
            "sw2_vs_teacher"} <= set(m["final"]) and m["teacher"]["nfe"] == 15
    assert m["final"]["sw2_x_teacher"] == pytest.approx(m["final"]["sw2"] / m["teacher"]["sw2"])
    assert len(m["final"]["mode_coverage"]) == 8 and 0 <= m["final"]["off_mode_pct"] <= 100
    assert m["it_s"] > 0 and m["wall_s"] > 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "generator" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert {"fake_denoise", "gan_d", "gan_g", "dmd", "regression"} <= set(train[-1])
    assert [r["step"] for r in rows if "sw2" in r] == [3, 6]
    assert {p.name for p in (run / "samples").iterdir()} >= {"step-2.png", "step-3.png", "step-6.png"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert (run / "generator.safetensors").is_file() and (run / "train.log").is_file()
    # the summary leads with sliced-W2, its ratio to the teacher's, and the mass off the modes
    student = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("student: "))
    assert [kv.split("=")[0] for kv in student.split()[1:4]] == ["sw2", "sw2_x_teacher", "off_mode_pct"]
    log = (run / "train.log").read_text()
    assert "warm-up: 20 regression steps on 256 teacher ODE pairs" in log
    # the cost estimate (issue 24): timed steps, the recipe's budget and its measured whole-run time
    estimate = next(line for line in log.splitlines() if "estimate: 6 training steps, about " in line)
    assert "1 thread); recipe diffusion-dmd2-mixture: CPU-sized, measured at about 78 s for the whole run" in estimate
    last = log.strip().splitlines()[-1]
    assert "dmd2 (1-step, step 6): sliced-W2 " in last and "the teacher's" in last and "off-mode mass" in last


@pytest.mark.parametrize("method", ["sid", "cd", "rectflow"])
def test_other_methods_run(tmp_path, method):
    extra = ["pairs=64", "teacher_steps=4"] if method == "rectflow" else []
    assert main(["diffusion", method, "steps=3", f"output_dir={tmp_path}", "name=r", *TINY, *extra,
                 *WARM[method]]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["final"]["step"] == 3 and (tmp_path / "r" / "metrics.jsonl").read_text()
    assert "off_mode_pct" in m["final"] and "off_mode_pct" in m["teacher"]
    assert ("warm-up: 20 regression steps" in (tmp_path / "r" / "train.log").read_text()) == (method != "rectflow")


def _generator_state(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_resume_is_exact(tmp_path):
    common = ["eval_every=0", "sample_every=0", "fake_steps=2", "gan=true", f"output_dir={tmp_path}", *TINY,
              *WARM["dmd2"]]  # the warm-up runs once; its pairs (the regression term's) are remade on resume
    assert main(["diffusion", "dmd2", "steps=8", "save_every=4", "name=straight", *common]) == 0
    assert main(["diffusion", "dmd2", "steps=4", "save_every=4", "name=cut", *common]) == 0
    assert main(["diffusion", "dmd2", "steps=8", "save_every=4", "name=cut", "resume=auto", *common]) == 0
    a = _generator_state(tmp_path / "straight" / "generator.safetensors")
    b = _generator_state(tmp_path / "cut" / "generator.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    log = (tmp_path / "cut" / "train.log").read_text()
    assert "resumed from" in log and "step-00000004" in log


def test_bad_input_gets_clear_errors(tmp_path):
    from kdkit.diffusion.run import resolve_config

    with pytest.raises(UnknownNameError, match="unknown diffusion method 'dmd3'.*Did you mean dmd2"):
        resolve_config("dmd3", [])
    with pytest.raises(ConfigError, match="unknown setting 'fake_step'.*Did you mean 'fake_steps'"):
        resolve_config("dmd2", ["fake_step=3"])
    with pytest.raises(ConfigError, match="options.fake_steps='many' is not allowed: expected an integer"):
        resolve_config("dmd2", ["fake_steps=many"])
    with pytest.raises(ConfigError, match="teacher=analytic exists only for data=mixture"):
        resolve_config("dmd2", ["data=cifar10"])
    with pytest.raises(ConfigError, match="fast.*not allowed"):
        resolve_config("dmd2", ["fast=turbo"])
    # through the CLI: exit code 2 and the message, no traceback
    assert main(["diffusion", "dmd3"]) == 2


def test_teacher_generator_shape_mismatch_is_refused():
    from kdkit.diffusion.engine import MethodContext, Schedule
    from kdkit.diffusion.dmd2 import build_dmd2
    from kdkit.diffusion.mixture import ring_mixture
    from kdkit.diffusion.mlp import MLPDenoiser, ResidualDenoiser

    teacher = ring_mixture().denoiser()
    ctx = MethodContext(teacher, Schedule(sigma_data=1.0), lambda: MLPDenoiser(dim=3, width=8, depth=2),
                        lambda: ResidualDenoiser(teacher, 8, 2), batch_size=4)
    from kdkit.diffusion.engine import check_shapes

    method = build_dmd2(ctx, gan=False)
    with pytest.raises(ShapeMismatchError, match="shape.*\\(2,\\)"):
        check_shapes(method.teacher, method.generator, method.sample_shape)


def test_missing_teacher_file_is_a_clear_error(tmp_path):
    with pytest.raises(KdkitError, match="nothing is there"):
        from kdkit.diffusion.run import run_method

        run_method("dmd2", [f"teacher={tmp_path / 'nope'}", "data=cifar10", "steps=1", *TINY])


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("KDKIT_SLOW"), reason="an EDM teacher's quality on the mixture (about 17 s); "
                    "make test trains a flow teacher to a stricter bar (test_diffusion_flow.py); KDKIT_SLOW=1")
def test_train_teacher_on_the_mixture_then_distill_from_it(tmp_path):
    """A kdkit-trained MLP teacher: its many-step samples land on the mixture (mode masses within a few points,
    sliced W2 far below a blurred Gaussian's), and DMD2 accepts it as a teacher (G and F copied from it)."""
    from kdkit.diffusion.metrics import sliced_w2
    from kdkit.diffusion.mixture import ring_mixture

    rc = main(["diffusion", "train-teacher", "steps=1500", "batch_size=256", "lr=2e-3", "ema_decay=0.99", "eval_samples=4000",
               "eval_steps=32", "arch_options={width: 128, depth: 3}", "threads=2", f"output_dir={tmp_path}",
               "name=t", "progress=false", "save_every=0"])
    assert rc == 0
    ev = json.loads((tmp_path / "t" / "metrics.json").read_text())["eval"]
    m = ring_mixture()
    blurred = torch.randn(4000, 2) * m.data_std
    assert ev["sw2"] < 0.4 * sliced_w2(blurred, m.sample(4000))
    assert ev["mode_mass_max_err"] < 4.0
    assert main(["diffusion", "dmd2", f"teacher={tmp_path / 't'}", "steps=2", f"output_dir={tmp_path}", "name=d",
                 *TINY, *WARM["dmd2"]]) == 0


def test_image_path_smoke(tmp_path):
    """Real CIFAR-10: a tiny class-conditional U-Net teacher (a few steps), then DMD2 with CFG folded into the
    teacher, a GAN head on real images and a 2-step generator, evaluated with FD (kdkit features) on a kdkit
    classifier checkpoint. Numbers are meaningless at this size; the path is what is tested."""
    from kdkit.models import build_model
    from kdkit.checkpoint import save_model

    opts = "arch_options={channels: 16, mult: [1, 2], blocks: 1, attn: [], dropout: 0.0}"
    assert main(["diffusion", "train-teacher", "data=cifar10", "steps=3", "batch_size=8", "train_limit=512", opts,
                 f"output_dir={tmp_path}", "name=t", "progress=false", "threads=2", "save_every=0"]) == 0
    clf = build_model("convnet3", width=8)
    save_model(clf, tmp_path / "clf.safetensors", {"model": "convnet3", "options": json.dumps({"width": 8}),
                                                   "num_classes": "10"})
    rc = main(["diffusion", "dmd2", "data=cifar10", f"teacher={tmp_path / 't'}", "steps=2", "batch_size=4",
               "fake_steps=2", "guidance_scale=2.0", "gan=true", "generator_steps=2", "eval_samples=16",
               "teacher_steps=2", f"fd_classifier={tmp_path / 'clf.safetensors'}", "train_limit=512",
               f"output_dir={tmp_path}", "name=d", "threads=2", "progress=false"])
    assert rc == 0
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert {"FD (kdkit features)", "precision", "recall", "FD (kdkit features) vs teacher"} <= set(m["final"])
    assert "FD (kdkit features)" in m["teacher"] and m["final"]["nfe"] == 2
    assert (tmp_path / "d" / "samples" / "step-2.png").is_file()


def test_inception_fid_needs_the_users_file(tmp_path):
    from kdkit.diffusion.features import InceptionFeatures

    with pytest.raises(ConfigError, match="inception-2015-12-05.pt"):
        InceptionFeatures(tmp_path / "missing.pt")

    class Fake(torch.nn.Module):  # the call signature of the TorchScript FID detector
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.float().flatten(1)[:, :5]

    torch.jit.script(Fake()).save(str(tmp_path / "fake.pt"))
    feats = InceptionFeatures(tmp_path / "fake.pt")(torch.zeros(2, 3, 4, 4))
    assert feats.shape == (2, 5) and (feats == 128).all()  # [-1, 1] -> uint8: 0.0 -> 128


def _tiny_method(seed=0):
    from kdkit.diffusion.dmd2 import build_dmd2
    from kdkit.diffusion.engine import MethodContext, Schedule
    from kdkit.diffusion.mixture import ring_mixture
    from kdkit.diffusion.mlp import MLPDenoiser, ResidualDenoiser

    torch.manual_seed(seed)
    teacher = ring_mixture().denoiser()
    ctx = MethodContext(teacher, Schedule(sigma_data=teacher.sigma_data),
                        lambda: MLPDenoiser(2, 16, 2, teacher.sigma_data), lambda: ResidualDenoiser(teacher, 16, 2),
                        batch_size=16)
    return build_dmd2(ctx, fake_steps=2, gan=False, lr_generator=1e-3, lr_fake=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("KDKIT_SLOW"), reason="compiling on a 2-core CPU takes minutes; KDKIT_SLOW=1")
def test_compiled_step_matches_eager_on_cpu():
    """torch.compile'd losses (inductor, C++ on CPU) give the same update as eager, draws included
    (`fallback_random` makes inductor use eager's RNG)."""
    import torch._inductor.config as inductor_config

    from kdkit.diffusion.fast_step import make_step

    eager, compiled = _tiny_method(), _tiny_method()
    inductor_config.fallback_random = True
    try:
        step_c = make_step(compiled, "compile")
        torch.manual_seed(1)
        eager.step({})
        torch.manual_seed(1)
        step_c({})
    finally:
        inductor_config.fallback_random = False
    for (n, a), b in zip(eager.generator.named_parameters(), compiled.generator.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    for a, b in zip(eager.fake.parameters(), compiled.fake.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_matches_eager():
    """The whole iteration captured as one CUDA graph (fused capturable AdamW, foreach EMA) makes the same updates
    as eager PyTorch, warm-up steps and replays alike, and the same logs (the guards' readings included)."""
    from kdkit.diffusion.data import MixtureData
    from kdkit.diffusion.dmd2 import build_dmd2
    from kdkit.diffusion.engine import MethodContext, Schedule
    from kdkit.diffusion.fast_step import make_step
    from kdkit.diffusion.guards import Guards, GuardSpec
    from kdkit.diffusion.mixture import ring_mixture
    from kdkit.diffusion.mlp import MLPDenoiser, ResidualDenoiser

    def method(capturable):
        torch.manual_seed(0)
        teacher = ring_mixture().denoiser().cuda()
        ctx = MethodContext(teacher, Schedule(sigma_data=teacher.sigma_data),
                            lambda: MLPDenoiser(2, 64, 3, teacher.sigma_data),
                            lambda: ResidualDenoiser(teacher, 64, 3), batch_size=256, capturable=capturable)
        m = build_dmd2(ctx, fake_steps=3, gan=False, lr_generator=1e-3, lr_fake=1e-3, ema_decay=0.9).cuda()
        m.plan.guards = Guards(GuardSpec(), MixtureData(ring_mixture(), "cuda"), torch.device("cuda"))
        return m

    eager, graphed = method(False), method(True)
    torch.manual_seed(5)
    for _ in range(3):
        eager.step({})
    torch.manual_seed(6)
    want = [eager.step({}) for _ in range(3)]
    torch.manual_seed(5)
    step = make_step(graphed, "cuda_graph", {})  # 3 eager warm-up steps, then the capture (which runs nothing)
    torch.manual_seed(6)  # replays read the generator's seed and offset as they are now, like eager draws
    got = [{k: v.clone() for k, v in step({}).items()} for _ in range(3)]
    torch.cuda.synchronize()
    assert {"sample_std_ratio", "modes_reached", "generator_grad_norm"} <= set(got[-1])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    for a, b in zip(eager.generator.parameters(), graphed.generator.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    for a, b in zip(eager.ema.parameters(), graphed.ema.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
