"""Bad command lines across every verb: each must end in one `kdkit: error:` line, exit code 2, before any work.

`{tmp}` in an argument is replaced by a scratch folder holding `corrupt.safetensors` (random bytes),
`checkpoint.pt` (a planted pickle) and `empty/` (a folder with nothing in it). Used by
`tests/test_bad_input_fuzz.py` (in `make test`) and `scripts/fuzz_cli.py` (the same cases as real processes,
counted as clear error / traceback / accepted).
"""
from __future__ import annotations

import itertools

KD = ["distill", "recipe=demo-kd"]
TRAIN = ["train", "recipe=demo-teacher"]
LM = ["distill", "recipe=smollm2-kd-small"]
COT = ["distill", "recipe=cot-math-small"]
IMG = ["condense", "cifar10"]
MTT = ["condense", "cifar10", "--method", "mtt"]
CVDD = ["condense", "cifar10", "--method", "cvdd"]
GRAPH = ["condense", "mutag"]
DMD2 = ["diffusion", "dmd2"]
TT = ["diffusion", "train-teacher"]
SIGNAL = ["teacher-signal", "recipe=smollm2-kd-small", "out={tmp}/store"]
CHECK = ["check", "teacher=smollm2-135m-instruct", "student=truncated-teacher"]


def _with(prefix: list[str], *overrides: str) -> list[list[str]]:
    return [prefix + [o] for o in overrides]


CASES: list[list[str]] = list(itertools.chain(
    # classifier KD and teacher training
    _with(KD, "trainer.epochs=-1", "trainer.epochs=0", "trainer.epochs=abc", "trainer.epochs=1.5",
          "trainer.grad_accum=0", "trainer.grad_accum=-2", "trainer.eval_every=0", "trainer.log_every=0",
          "trainer.keep_checkpoints=-1", "trainer.save_every_steps=-5", "trainer.threads=0", "trainer.seed=abc",
          "trainer.seed=-1", "trainer.mixed_precision=fp8", "trainer.compile=maybe", "trainer.bogus=1",
          "optim.lr=-1", "optim.lr=nan", "optim.lr=inf", "optim.lr=0", "optim.momentum=-0.5",
          "optim.weight_decay=-1", "optim.betas=[1.5,0.9]", "optim.betas=[0.9]", "optim.name=lamb",
          "scheduler.gamma=-1", "scheduler.gamma=nan", "scheduler.milestones=[a]", "scheduler.warmup_epochs=-1",
          "scheduler.min_lr=-1", "scheduler.name=linear", "data.batch_size=0", "data.batch_size=-1",
          "data.eval_batch_size=0", "data.train_per_class=0", "data.test_limit=-1", "data.name=imagenet",
          "losses.kd.T=0", "losses.kd.T=-4", "losses.kd.T=nan", "losses.kd.weight=nan", "losses.kd.weight=-1",
          "losses.nope.weight=1", "losses.kd.alpha=1", "losses.kd.type=unknown", "ce_weight=nan", "ce_weight=-1",
          "name=../../x", "name=/tmp/kdkit-abs", "name=a/b", "name=..", "resume={tmp}/empty",
          "teacher.checkpoint={tmp}/missing.safetensors", "teacher.checkpoint={tmp}/corrupt.safetensors",
          "student.model=resnet9000", "student.options={width: -3}", "student.options={bogus: 1}",
          "trainer.epochs", "=5", "a..b=1", "teacher.cache={tmp}/missing-cache"),
    [["distill", "recipe=dkd-resnet32x4-resnet8x4", "losses.dkd.beta=-8"],
     ["distill", "recipe=kd-resnet32x4-resnet8x4", "optim.nesterov=true", "optim.momentum=0"],
     ["distill", "recipe=does-not-exist"], ["distill"], ["distill", "recipe=demo-kd", "--no-such-flag"]],
    _with(TRAIN, "trainer.epochs=-1", "optim.lr=nan", "losses.kd.weight=1", "data.batch_size=0",
          "scheduler.milestones=[-5]"),
    # LM KD
    _with(LM, "llm.block_size=0", "llm.block_size=-1", "llm.chunk_size=0", "llm.max_steps=0",
          "llm.train_examples=0", "llm.eval_examples=-1", "llm.on_policy.fraction=1.5", "llm.on_policy.fraction=nan",
          "llm.on_policy.temperature=0", "llm.on_policy.top_p=0", "llm.on_policy.top_p=1.5",
          "llm.on_policy.max_new_tokens=0", "llm.dtype=int8", "llm.lora.r=0", "llm.lora.dropout=1.5",
          "losses.kd.divergence=foo", "losses.kd.beta=2", "llm.eval_every_steps=-1", "teacher.model=null",
          "llm.on_policy.prompt_tokens=-1"),
    [LM + ["--dry-run", "llm.block_size=0"], LM + ["--dry-run", "optim.lr=nan"]],
    # chain-of-thought distillation
    _with(COT, "cot.samples=0", "cot.temperature=-1", "cot.top_p=0", "cot.max_new_tokens=0",
          "cot.train_questions=0", "cot.shard_size=0", "cot.sft=foo", "cot.short_ratio=2", "cot.redi_alpha=nan",
          "cot.sft_epochs=0", "cot.kd_weight=-1", "cot.max_length=0", "cot.backend=sglang", "cot.redi_lr=-1",
          "cot.eval_max_new_tokens=0", "cot.kd_divergence=foo", "cot.generations={tmp}/empty", "name=../x"),
    # image dataset distillation
    [IMG + ["--ipc", "0"], IMG + ["--ipc", "-1"], IMG + ["--ipc", "abc"], IMG + ["--method", "foo"],
     IMG + ["--eval", "foo"], ["condense", "imagenet"]],
    _with(IMG, "iterations=-1", "lr_img=nan", "lr_img=-1", "width=0", "eval_epochs=-1", "eval_nets=0",
          "train_subset=0", "seed=abc", "checkpoint_every=0", "dsa_strategy=foo", "name=../x", "unknown_key=1",
          "zca=banana", "batch_real=0", "device=tpu", "eval_lr=nan", "test_subset=-3", "seed=-1", "full_epochs=0"),
    _with(MTT, "experts=0", "experts=-1", "syn_steps=0", "match_epochs=0", "max_start_epoch=-1", "batch_syn=0",
          "lr_lr=nan", "lr_teacher=0", "tesla=maybe", "expert_epochs=0", "experts_dir={tmp}/missing"),
    _with(CVDD, "preset=gpu", "members=foo", "voters=0", "recover_lr=nan", "r_bn=-1", "patch_difficulty=hard2",
          "jitter=-1"),
    # graph dataset distillation
    _with(GRAPH, "depth=0", "epochs=0", "seeds=0", "lr=nan", "lr=-1", "dropout=1.5", "pool=max",
          "samples_per_epoch=0", "min_support=-1", "top_trees=0", "hidden=0", "batch_size=0", "baselines=foo",
          "unknown=1", "weight_decay=-1", "name=../x", "first_seed=-1", "min_support=abc"),
    [GRAPH + ["--seeds", "-1"], GRAPH + ["--gnn", "foo"], GRAPH + ["--method", "dm"]],
    # few-step diffusion distillation and teacher training
    _with(DMD2, "steps=0", "steps=-1", "batch_size=0", "eval_samples=0", "teacher_steps=0", "fake_steps=0",
          "guidance_scale=nan", "lr_generator=-1", "lr_generator=nan", "lr_fake=0", "ema_decay=1.5", "sampler=ddim",
          "fast=jit", "device=tpu", "width=0", "depth=0", "eval_every=-1", "save_every=-1", "name=../x",
          "teacher={tmp}/missing", "data=mnist", "unknown=1", "generator_steps=0", "threads=0",
          "teacher={tmp}/corrupt.safetensors", "resume={tmp}/empty"),
    [["diffusion", "sid", "alpha=nan"], ["diffusion", "cd", "lr=-1"], ["diffusion", "rectflow", "teacher_steps=0"],
     ["diffusion", "foo"]],
    _with(TT, "steps=0", "lr=nan", "label_dropout=1.5", "ema_decay=2", "batch_size=0", "arch=vit", "p_std=-1",
          "grad_clip=-1", "eval_steps=0"),
    # stored teacher signals, pre-flight check
    _with(SIGNAL, "kind=foo", "k=0", "k=abc", "temperature=0", "batch_size=0", "samples=0"),
    [["teacher-signal", "recipe=smollm2-kd-small"]],
    # a served teacher (nothing listens on port 9: refused before any work), `kdkit serve-teacher`'s options
    _with(LM, "teacher.server=ftp://x", "teacher.server_k=0", "teacher.server_timeout=nan",
          "teacher.server_concurrency=0", "teacher.server_retries=-1"),
    [[*LM, "teacher.server=http://127.0.0.1:9", "student.model=truncated-teacher"],
     [*LM, "teacher.server=http://127.0.0.1:9", "student.model=smollm2-135m-instruct", "student.options={}",
      "teacher.server_retries=0"],
     [*LM, "teacher.server=http://127.0.0.1:9", "losses.kd.T=2"],
     [*COT, "cot.backend=server"], [*SIGNAL, "teacher.server=http://127.0.0.1:9", "k=64", "teacher.server_k=20"],
     ["serve-teacher", "smollm2-135m-instruct", "port=0"], ["serve-teacher", "smollm2-135m-instruct", "dtype=int8"],
     ["serve-teacher", "smollm2-135m-instruct", "python=/nonexistent/python"], ["serve-teacher", "nope:model"]],
    _with(CHECK, "dtype=int4", "seq_len=0", "batch_size=-1", "unknown=1"),
    # benchmarks
    [["bench", "foo"], ["bench", "throughput", "batch=0"], ["bench", "throughput", "steps=abc"],
     ["bench", "throughput", "variants=foo"], ["bench", "classifier", "method=nope"],
     ["bench", "classifier", "seeds=0"], ["bench", "kernels", "tokens=0"], ["bench", "kernels", "divergences=foo"],
     ["bench", "llm", "seeds=0"], ["bench", "generation", "prompts=0"], ["bench", "condense-graphs", "datasets=foo"],
     ["bench", "condense-graphs", "seeds=0"], ["bench", "condense-images", "seeds=0"], ["bench", "cot", "seeds=0"],
     ["bench", "diffusion", "steps=0"], ["bench", "diffusion", "modes=foo"], ["bench", "classifier-table", "x=1"],
     ["recipes", "extra"]],
    # loss options: each range declared beside its type, wrapper options checked against their inner loss
    [["distill", "recipe=weighted-kd-resnet32x4-resnet8x4", "losses.kd.inner=jsd", "losses.kd.beta=2"],
     ["distill", "recipe=weighted-kd-resnet32x4-resnet8x4", "losses.kd.scheme=confidence"],
     ["distill", "recipe=dualhead-kd-resnet32x4-resnet8x4", "losses.dhkd.head=mlp"],
     ["distill", "recipe=dkd-resnet32x4-resnet8x4", "losses.dkd.warmup=-1"]],
    _with(LM, "losses.kd.skew=1", "losses.kd.T=inf"),
    [LM + ["losses.kd.type=taid", "losses.kd.t_end=0"], LM + ["losses.ct.type=cross_tokenizer", "losses.ct.chunks=words"]],
    _with(KD, "losses.kd.standardize=maybe", "losses.nd.centres={tmp}/missing.safetensors"),
    # rationale distillation: rules that need no model or data; `kdkit check`; the cot and generation benches
    _with(COT, "student.options={layers: 0}", "student.options={width: 3}", "data.name=cifar10",
          "teacher.cache={tmp}/empty", "teacher.model={tmp}/empty", "cot.generations={tmp}/missing",
          "cot.rationale_weight=-1", "cot.top_p=1.5", "trainer.keep_checkpoints=0"),
    [COT + ["--dry-run", "cot.samples=0"]],
    _with(CHECK, "device=tpu", "student.layers=0", "student.width=3", "lora.r=0", "lora=maybe", "chunk_size=0",
          "seq_len=nan"),
    [["check", "student=truncated-teacher"]],
    [["bench", "cot", "cot.samples=0"], ["bench", "cot", "recipe=demo-kd"], ["bench", "cot", "seeds=-1"],
     ["bench", "generation", "backends=foo"], ["bench", "generation", "top_p=0"], ["bench", "generation", "n=0"],
     ["bench", "generation", "temperature=nan"], ["bench", "generation", "split=dev"]],
    # few-step diffusion: method options bare and as options.*, nested settings, recipes, teachers, the bench
    _with(DMD2, "options.fake_steps=0", "lr_generator=inf", "betas=[0.9]", "betas=[1.5,0.9]", "sigma_lo=2",
          "warmup_steps=-1", "options.bogus=1", "mixture.modes=0", "mixture.std=0", "mixture.weights=[1,2]",
          "keep_checkpoints=0", "log_every=0", "compile_mode=fast", "data=cifar10", "method=sid",
          "recipe=diffusion-sid-mixture", "recipe=demo-kd", "teacher=diffusers:{tmp}/missing",
          "teacher={tmp}/checkpoint.pt", "fd_classifier={tmp}/missing", "fd_classifier={tmp}/corrupt.safetensors", "train_limit=0",
          "seed=-1"),
    [["diffusion", "sid", "data=mnist16", "fd_classifier={tmp}/corrupt.safetensors"],
     ["diffusion", "cd", "data=mnist16", "fd_classifier={tmp}/empty"]],
    [["diffusion", "sid", "t_max=1.5"], ["diffusion", "cd", "grid=1"], ["diffusion", "cd", "target_decay=1"],
     ["diffusion", "rectflow", "pairs=0"], ["diffusion", "rectflow", "options.teacher_steps=0"],
     DMD2 + ["--dry-run", "fake_steps=0"]],
    _with(TT, "arch=unet", "arch_options={width: 0}", "arch_options={bogus: 1}", "p_mean=inf", "save_every=-1",
          "data=imagenet", "resume={tmp}/empty"),
    # flow-matching teachers: the objective, SD3's timestep shift (for a flow teacher only), the methods' shift
    _with(TT, "objective=sd3", "flow_shift=0", "flow_shift=2", "flow_shift=nan"),
    [TT + ["objective=flow", "flow_shift=-1"], DMD2 + ["flow_shift=0"], ["diffusion", "sid", "flow_shift=inf"]],
    [["bench", "diffusion", "model=vit"], ["bench", "diffusion", "fake_steps=0"], ["bench", "diffusion", "bogus=1"]],
))

# dataset distillation: recipes, presets, method options and resume
CASES += [IMG + ["preset=tiny"], IMG + ["recipe=condense-nci1-mirage"], GRAPH + ["recipe=condense-cifar10-dm"],
          IMG + ["recipe=condense-cifar10-dm", "preset=cpu"], IMG + ["recipe=nope"], IMG + ["recipe=demo-kd"],
          IMG + ["resume={tmp}/empty"], IMG + ["experts=3"], IMG + ["options.lr_img=0"], IMG + ["eval_student=vit_h"],
          MTT + ["match_epochs=60"], MTT + ["lr_teacher=inf"], ["condense", "cifar10", "--method", "datm", "ema_decay=1"],
          ["condense", "cifar10", "--method", "datm", "min_start_epoch=49"], CVDD + ["members="],
          CVDD + ["min_scale=0"], CVDD + ["label_topk=0"], CVDD + ["members=convnet3"], GRAPH + ["gnns="],
          GRAPH + ["min_support=[0.5,2.5]"], GRAPH + ["max_len=0"], GRAPH + ["resume={tmp}/empty"],
          ["bench", "condense-images", "ipcs=0"], ["bench", "condense-images", "methods=dm", "experts=3"],
          ["bench", "condense-images", "table=only", "iterations=3"], ["bench", "condense-speed", "steps=0"],
          ["bench", "condense-speed", "impls=foo"], ["bench", "condense-reference", "ipcs=0"],
          ["bench", "condense-graphs", "gnns=foo"], ["bench", "condense-graphs", "epochs=0"]]

# classifier and LM distillation: rules that need no data or model (`check_recipe`, what --dry-run runs too),
# the resume rule, `kdkit teacher-signal`'s typed options, and the throughput/classifier/llm/kernels benches
CASES += [KD + ["teacher.cache={tmp}/corrupt.safetensors"], TRAIN + ["student.checkpoint={tmp}/corrupt.safetensors"],
          KD + ["--dry-run", "teacher.checkpoint={tmp}/corrupt.safetensors"], TRAIN + ["student.model=timm:no_such_net"],
          TRAIN + ["data.name=gsm9k"], TRAIN + ["resume={tmp}/checkpoint.pt"], TRAIN + ["ce_weight=0"],
          TRAIN + ["peer.model=convnet3"], TRAIN + ["student.options={width: 0}"],
          LM + ["llm.on_policy.backend=trl", "llm.max_steps=null"],
          LM + ["llm.on_policy.backend=trl", "losses.kd.divergence=tvd"],
          LM + ["llm.on_policy.backend=trl", "losses.kd.T=2"], LM + ["llm.on_policy.backend=trl", "resume=auto"],
          LM + ["trainer.mixed_precision=fp16", "llm.dtype=float16"], LM + ["llm.fused=true", "losses.kd2.type=token_kd"],
          LM + ["llm.fused=true", "teacher.cache={tmp}/empty"], LM + ["teacher.cache={tmp}/empty"],
          LM + ["student.model=resnet9000", "student.options={}"], LM + ["student.options={depth: 3}"], LM + ["student.options={layers: 0}"],
          LM + ["student.model=scratch", "llm.lora={r: 4}"], LM + ["teacher.model={tmp}/empty"],
          LM + ["teacher.model='hf:'"], LM + ["data.name={tmp}/missing.jsonl"], LM + ["teacher.checkpoint={tmp}/empty"],
          LM + ["resume={tmp}/empty"], LM + ["llm.on_policy.fraction=0.5", "llm.on_policy.prompt_tokens=128"],
          LM + ["--dry-run", "llm.on_policy.backend=trl", "llm.max_steps=null"],
          ["train", "recipe=smollm2-kd-small", "losses={}", "llm.on_policy.fraction=0.5"],
          ["train", "recipe=smollm2-kd-small", "losses={}", "llm.fused=true"],
          ["train", "recipe=lm-scratch", "student.options.config=null"],
          SIGNAL + ["samples=40000"], SIGNAL + ["out="], SIGNAL + ["kind=topk", "k=-1"], SIGNAL + ["temperature=nan"],
          SIGNAL + ["codec=zip"], SIGNAL + ["codec=compact", "bits=9"], SIGNAL + ["kind=dense", "codec=compact"],
          ["bench", "signal-compression", "bits=0"], ["bench", "signal-compression", "bits=4,9"],
          ["bench", "signal-compression", "blocks=0"], ["bench", "served-teacher", "k=0"],
          ["bench", "served-teacher", "threads=abc"],
          SIGNAL + ["teacher.model=null"], SIGNAL + ["data.name={tmp}/missing.jsonl"], SIGNAL + ["llm.block_size=0"],
          ["teacher-signal", "recipe=demo-kd", "out={tmp}/store"],
          ["bench", "throughput", "warmup=0"], ["bench", "throughput", "teacher=resnet9000"],
          ["bench", "throughput", "batch=4096", "steps=20"], ["bench", "throughput", "compile_mode=fast"],
          ["bench", "throughput", "bogus=1"], ["bench", "classifier", "pair=resnet56"],
          ["bench", "classifier", "method=kd", "pair=resnet56-resnet9000"], ["bench", "classifier", "method=kd"],
          ["bench", "classifier", "method=kd", "pair=resnet56-resnet20", "fast=maybe"],
          ["bench", "classifier", "method=kd", "pair=resnet56-resnet20", "epochs=0"],
          ["bench", "classifier", "method=kd", "pair=resnet56-resnet20", "teacher={tmp}/missing"],
          ["bench", "classifier", "method=kd", "pair=resnet56-resnet20", "teacher={tmp}/corrupt.safetensors"],
          ["bench", "classifier", "method=dkd", "pair=resnet56-resnet20", "losses.dkd.beta=-1"],
          ["bench", "llm", "methods=foo"], ["bench", "llm", "recipe=demo-kd"], ["bench", "llm", "llm.block_size=0"],
          ["bench", "llm", "recipe=nope"], ["bench", "llm", "llm.on_policy.backend=trl", "llm.max_steps=null"],
          ["bench", "kernels", "beta=2"], ["bench", "kernels", "impls=foo"], ["bench", "kernels", "dtype=int8"],
          ["bench", "kernels", "vocab=8192,abc"], ["bench", "kernels", "hidden=[64,0]"], ["bench", "kernels", "T=0"]]

# --dry-run runs every check a real run makes, for every verb that has it
CASES += [IMG + ["--dry-run", "lr_img=nan"], GRAPH + ["--dry-run", "depth=0"], DMD2 + ["--dry-run", "fake_steps=0"],
          KD + ["--dry-run", "student.options={width: -3}"], COT + ["--dry-run", "cot.kd_divergence=foo"],
          ["diffusion", "rectflow", "pairs=10", "batch_size=64"], ["check", "recipe=demo-kd"]]
