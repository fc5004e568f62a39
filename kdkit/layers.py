"""kdkit's layers, lowest first: a package may import its own layer's packages or lower ones, never a higher one,
and the import graph has no circles (`tests/test_layering.py`, `python scripts/import_graph.py`).

    errors, registry      names and the error types every layer raises
    checkpoint            the one file format (safetensors + JSON + manifest)
    budget                what a run will cost: a recipe's budget and the one estimate line
    config                the one options mechanism (types, ranges, recipes, overrides)
    run, method           the one Run and the one method contract + training loop
    data, models          datasets (offline first) and networks with feature taps
    divergence            the one definition of the divergences (name, T, beta, skew, per-row math, gradients)
    signals               typed teacher signals (dense, hidden + head, top-k, sampled, cross-tokenizer)
    losses                the loss zoo (pure tensor functions + modules)
    kernels               fused kernels with their pure-torch references
    train                 the accelerate step shared by classifier and LM distillation
    llm, condense, diffusion   the pillars
    bench, demo           benchmarks and the demo, over the pillars
    cli                   the `kdkit` command
"""
LAYERS: list[list[str]] = [
    ["layers"], ["errors"], ["registry"], ["checkpoint"], ["budget"], ["config"], ["run"], ["method"], ["data", "models"], ["divergence"], ["signals"], ["losses"],
    ["kernels"], ["train"], ["llm", "condense", "diffusion"], ["bench", "demo"], ["cli"],
]
