"""The compact top-k codec and the DistillKit layout: hand-checked encodings and KL values, bytes per token, the
store written and read through the ordinary path (and trained from), and the export/import round trip."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdkit.bench.signal_compression import ReconstructionKL, column_disk_bytes
from kdkit.errors import ConfigError, TokenizerMismatchError
from kdkit.llm.distillkit_layout import (DistillKitCompression, decode_logprobs, encode_logprobs, export_distillkit,
                                         import_distillkit, pack_bits, read_distillkit, unpack_bits)
from kdkit.llm.signal_codec import decode_compact, encode_compact, payload_bytes, tail_logmass
from kdkit.llm.signal_store import SignalSpec, open_signal_store, signal_kd_loss, write_signal_store
from kdkit.llm.tokenizers import chat_template_sha256
from kdkit.losses.token import token_kd_loss
from kdkit.signals import sparse_to_dense_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _kl(p, q_logprobs):
    return float((p * (p.log() - q_logprobs)).sum())


# ------------------------------------------------------------------ the codec by hand


def test_compact_codes_of_a_hand_example():
    """p = (0.5, 0.3, 0.15) on ids 7, 2, 4 of V = 5, tail mass 0.05 on the two other ids, 2-bit codes."""
    p = torch.tensor([0.5, 0.3, 0.15], dtype=torch.float64)
    enc = encode_compact(torch.tensor([7, 2, 4]), p.log().float(), torch.tensor(math.log(0.05)), bits=2)
    assert enc["id_gaps"].tolist() == [2, 2, 3]           # sorted ids 2, 4, 7
    d_max = math.log(0.5 / 0.15)                           # 1.2040: the grid is 0, d_max/3, 2 d_max/3, d_max
    step = float(torch.tensor(d_max / 3).half())
    assert float(enc["step"]) == step
    # id 2: d = log(0.5/0.3) = 0.5108 = 1.27 steps -> 1; id 4: d_max -> 3; id 7 (the top-1): 0
    assert enc["codes"].tolist() == [1, 3, 0]
    ids, vals = decode_compact(enc["id_gaps"], enc["codes"], enc["step"], enc["tail_logmass"])
    assert ids.tolist() == [7, 2, 4]                       # descending again
    # the kept ids share 1 - 0.05 = 0.95 in proportion to exp(-code * step)
    w = torch.exp(-torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64) * step)
    kept = 1 - math.exp(float(enc["tail_logmass"].float()))
    assert torch.allclose(vals.double(), (kept * w / w.sum()).log(), atol=1e-6)
    # KL against the teacher (the tail is exactly uniform, so only the top-1/2/3 rounding costs):
    # 0.5 ln(0.5/0.48237) + 0.3 ln(0.3/0.32292) + 0.15 ln(0.15/0.14471) = 0.00125 nats
    q = sparse_to_dense_logprobs(ids, vals, 8, "uniform")
    teacher = torch.zeros(8, dtype=torch.float64)
    teacher[[7, 2, 4]] = p
    teacher[[0, 1, 3, 5, 6]] = 0.05 / 5
    assert _kl(teacher, q.double()) == pytest.approx(0.00125, abs=2e-5)


def test_hand_kl_of_a_uniform_tail():
    """p = (0.6, 0.25, 0.1, 0.05), k = 2: the codes are exact, the tail 0.15 is spread as 0.075 + 0.075, so the KL
    is the tail's alone: 0.1 ln(0.1/0.075) + 0.05 ln(0.05/0.075) = 0.008495 nats, for any number of bits."""
    p = torch.tensor([0.6, 0.25, 0.1, 0.05], dtype=torch.float64)
    want = 0.1 * math.log(4 / 3) + 0.05 * math.log(2 / 3)
    tail = tail_logmass(p.log(), torch.tensor([0, 1]))
    assert float(tail) == pytest.approx(math.log(0.15))
    for bits in (2, 4, 8):
        enc = encode_compact(torch.tensor([0, 1]), p[:2].log().float(), tail, bits)
        ids, vals = decode_compact(enc["id_gaps"], enc["codes"], enc["step"], enc["tail_logmass"])
        assert _kl(p, sparse_to_dense_logprobs(ids, vals, 4, "uniform").double()) == pytest.approx(want, abs=1e-4)
    # the bench's closed-form KL is the densified one
    kl = ReconstructionKL(p.log().float()[None])(ids[None], vals[None])
    assert float(kl) == pytest.approx(want, abs=1e-4)


def test_tail_mass_survives_where_plain_rounding_loses_it():
    """p = (0.45, 0.35, 0.19, 0.01 - 1e-6) and a tail of 1e-6 over 996 ids: the fp16-rounded top-4 add up to more
    than 1, so the plain layout's uniform tail gets nothing and its KL is infinite; the compact codec stores the
    tail's mass and keeps it."""
    V = 1000
    p = torch.full((V,), 1e-6 / 996, dtype=torch.float64)
    p[:4] = torch.tensor([0.45, 0.35, 0.19, 0.01 - 1e-6], dtype=torch.float64)
    vals, ids = p.log().topk(4)
    assert 1 - vals.half().float().exp().sum() < 0
    assert math.isinf(_kl(p, sparse_to_dense_logprobs(ids, vals.half(), V, "uniform").double()))
    enc = encode_compact(ids, vals.float(), tail_logmass(p.log(), ids), bits=4)
    assert float(enc["tail_logmass"].float()) == pytest.approx(math.log(1e-6), rel=1e-3)
    got = decode_compact(enc["id_gaps"], enc["codes"], enc["step"], enc["tail_logmass"])
    kl = _kl(p, sparse_to_dense_logprobs(*got, V, "uniform").double())
    assert 0 < kl < 2e-3  # the 4-bit codes' rounding; the tail, exactly uniform, costs nothing


def test_payload_bytes_per_token():
    assert payload_bytes(64, 4, 49152) == 64 * 2 + 64 * 4 / 8 + 4 == 164      # 16-bit gaps, 4-bit codes, 2 halves
    assert payload_bytes(64, 8, 200_000) == 64 * 4 + 64 + 4                   # ids past 16 bits: int32 gaps
    # DistillKit's budget setting at a 16-bit vocabulary: 1 bf16 + 3 float32 terms + 50 ids x 16 bits = 114
    budget = DistillKitCompression(d=49152, k=50, exact_k=1, exact_dtype="bfloat16",
                                   polynomial_terms=(0, 1, "sqrt"))
    assert budget.bytes_per_position() == 2 + 12 + 100 == 114


def test_bits_are_packed_msb_first():
    assert pack_bits(np.array([[1]]), 3).tolist() == [[0b00100000]]
    assert pack_bits(np.array([[5, 3]]), 4).tolist() == [[0x53]]
    vals = np.random.default_rng(0).integers(0, 2**17, size=(3, 50))
    assert np.array_equal(unpack_bits(pack_bits(vals, 17), 17, 50), vals)


def test_distillkit_log_prob_bytes_by_hand():
    cfg = DistillKitCompression(d=100, k=4, exact_k=4, exact_dtype="float16", delta_encoding=False)
    x = np.array([[-0.5, -1.0, -2.0, -4.0]])
    raw = encode_logprobs(x, cfg)
    assert raw.tolist() == [list(np.array([-0.5, -1.0, -2.0, -4.0], "<f2").view(np.uint8))]
    assert np.array_equal(decode_logprobs(raw, cfg), x)
    # delta encoding, one exact float32 value, the deltas (-0.5, -1, -2) in a 2-bit bin: scale = max|r| / 2 = 1,
    # codes round(r / scale) + 2 = (2, 1, 0) (-0.5 rounds to even, 0), bits 10 01 00 00 = 0x90
    cfg = DistillKitCompression.from_dict({"d": 100, "k": 4, "exact_k": 1, "exact_dtype": "float32",
                                           "delta_encoding": True, "residual_bins": [
                                               {"scale_dtype": "float32", "element_bits": 2, "num_elements": 3}]})
    raw = encode_logprobs(x, cfg)
    assert raw[0].tolist() == [*np.array([-0.5], "<f4").view(np.uint8), *np.array([1.0], "<f4").view(np.uint8), 0x90]
    assert cfg.bytes_per_position() == 9 + 4  # and 4 ids x ceil(log2 100) = 7 bits: 28 bits in 4 bytes
    assert decode_logprobs(raw, cfg).tolist() == [[-0.5, -0.5, -1.5, -3.5]]  # deltas (-0.5, 0, -1, -2) summed


def test_polynomial_part_is_the_least_squares_fit():
    cfg = DistillKitCompression(d=49152, k=50, exact_k=1, exact_dtype="bfloat16", polynomial_terms=(0, 1, "sqrt"),
                                delta_encoding=False)
    x = -np.cumsum(np.random.default_rng(1).exponential(0.3, size=(6, 50)), axis=-1)  # descending log-probs
    back = decode_logprobs(encode_logprobs(x, cfg), cfg)
    t = np.arange(49.0)
    X = np.stack([np.ones_like(t), t, np.sqrt(t)], -1)
    fit = np.linalg.lstsq(X, x[:, 1:].T, rcond=None)[0].T @ X.T
    assert np.allclose(back[:, 1:], fit, atol=1e-4)
    assert np.allclose(back[:, 0], x[:, 0], rtol=2**-8)  # bfloat16


def test_bad_settings_are_refused_in_one_line():
    for kwargs, match in [({"codec": "zip"}, "signal codec must be one of plain, compact, got 'zip'"),
                          ({"kind": "dense", "codec": "compact"}, "signal codec 'compact' stores top-k"),
                          ({"codec": "compact", "bits": 9}, "signal bits must be an integer from 2 to 8"),
                          ({"codec": "compact", "bits": 1}, "signal bits must be")]:
        with pytest.raises(ConfigError, match=match) as e:
            SignalSpec(**kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="exact_k must be an integer from 0 to k=4"):
        DistillKitCompression(d=10, k=4, exact_k=5)
    with pytest.raises(ConfigError, match="needs polynomial_terms or residual_bins"):
        DistillKitCompression(d=10, k=4, exact_k=2)
    with pytest.raises(ConfigError, match="exact_dtype must be one of"):
        DistillKitCompression(d=10, k=4, exact_k=4, exact_dtype="int8")
    with pytest.raises(ConfigError, match="unknown key 'kk'"):
        DistillKitCompression.from_dict({"d": 10, "k": 4, "exact_k": 4, "kk": 1})
    with pytest.raises(ConfigError, match="error_diffusion"):
        encode_logprobs(np.zeros((1, 4)), DistillKitCompression(d=10, k=4, exact_k=4, error_diffusion=True))


# ------------------------------------------------------------------ stores


V, L, N = 49152, 65, 6  # SmolLM2's vocabulary; ids past 2^15 exercise the full 16-bit gaps


class LowRankTeacher(torch.nn.Module):
    """A bigram teacher with a rank-16 table: cheap logits over a real 49k vocabulary."""

    def __init__(self, seed=0, scale=1.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb, self.head = torch.randn(V, 16, generator=g), torch.randn(16, V, generator=g) * scale
        self.config = SimpleNamespace(vocab_size=V)
        self.name_or_path = "low-rank-bigram"

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.emb[input_ids] @ self.head)


@pytest.fixture(scope="module")
def tok():
    from kdkit.llm.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def teacher():
    return LowRankTeacher()


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, V, (N, L), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(teacher, blocks):
    return torch.log_softmax(teacher(blocks).logits[:, :-1].float(), -1)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, teacher, blocks, tok):
    root = tmp_path_factory.mktemp("compact")
    specs = {"plain": SignalSpec("topk", k=64), "compact": SignalSpec("topk", k=64, codec="compact"),
             "plain32": SignalSpec("topk", k=32, dtype="bfloat16")}
    return {name: write_signal_store(teacher, blocks, root / name, spec, tok, batch_size=4, progress=False)
            for name, spec in specs.items()}


def _everything(path, tok):
    got = list(open_signal_store(path, tok).batches(4))
    return {k: torch.cat([b[k] for b in got]) for k in got[0] if torch.is_tensor(got[0][k])}


def test_compact_store_reads_as_plain_topk(stores, reference, tok):
    got = _everything(stores["compact"], tok)
    vals, ids = reference.topk(64, dim=-1)
    assert got["logprobs"].dtype == torch.float32 and got["indices"].shape == (N, L - 1, 64)
    assert torch.equal(got["indices"].sort(-1).values, ids.sort(-1).values)   # the same top-64 ids
    assert (got["logprobs"].diff(dim=-1) <= 0).all()                          # descending, as top-k promises
    # each value within half a code step of the teacher's, up to the shift that restores the stored tail mass
    meta = open_signal_store(stores["compact"], tok).meta
    assert meta["columns"]["id_gaps"]["dtype"] == "uint16" and meta["columns"]["codes"]["dtype"] == "uint8"
    teacher_at = reference.gather(-1, got["indices"])
    err = (got["logprobs"] - teacher_at)
    d_max = vals[..., 0] - vals[..., -1]
    spread = err.amax(-1) - err.amin(-1)
    assert (spread <= d_max / 15 * 1.01 + 1e-3).all()
    tail = torch.logsumexp(reference.scatter(-1, ids, float("-inf")), -1)
    assert torch.allclose(got["tail_logmass"].float(), tail, atol=2e-3, rtol=1e-3)
    assert torch.allclose(got["logprobs"].exp().sum(-1), 1 - got["tail_logmass"].float().exp(), atol=1e-5)


def test_compact_store_bytes_and_metadata(stores, tok):
    plain, compact = (open_signal_store(stores[k], tok).meta for k in ("plain", "compact"))
    assert compact["payload_bytes_per_token"] == 164 and plain["payload_bytes_per_token"] == 64 * (16 + 16) / 8
    # the signal's columns on disk: random bigram ids share nothing between positions, the worst case for the
    # gaps (the ~log2 C(V, 64) / 8 = 88 bytes of which ids were kept leave little to compress); still under 150
    signal = {name: column_disk_bytes(open_signal_store(stores[name]).files, cols) / (N * (L - 1))
              for name, cols in (("plain", {"indices", "logprobs"}),
                                 ("compact", {"id_gaps", "codes", "step", "tail_logmass"}))}
    assert signal["compact"] < 150 < signal["plain"]
    assert compact["bytes_per_token"] < 0.6 * plain["bytes_per_token"]
    assert compact["chat_template_sha256"] == chat_template_sha256(tok) and len(compact["chat_template_sha256"]) == 64
    assert compact["spec"]["temperature"] == 1.0 and compact["vocab_size"] == V and compact["tokenizer_fingerprint"]


def test_compact_reconstruction_beats_plain_top32_bf16(stores, reference, tok):
    kl_of = ReconstructionKL(reference.flatten(0, 1))
    kls = {}
    for name in ("plain32", "plain", "compact"):
        got = _everything(stores[name], tok)
        kls[name] = kl_of(got["indices"].flatten(0, 1), got["logprobs"].flatten(0, 1))
    finite = {name: torch.isfinite(kl) for name, kl in kls.items()}
    common = finite["plain32"] & finite["plain"] & finite["compact"]
    mean = {name: float(kl[common].mean()) for name, kl in kls.items()}
    assert finite["compact"].all()                   # the stored tail mass: no position loses its tail
    assert mean["compact"] < 0.8 * mean["plain32"]
    assert mean["compact"] < 1.05 * mean["plain"]    # 4-bit codes cost little against the tail's error


def test_training_from_the_compact_store(stores, reference, blocks, tok):
    """The ordinary reading path: store batches -> `signal_kd_loss` (via `batch_signal`) -> a student step."""
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Linear(8, V))
    opt = torch.optim.Adam(student.parameters(), lr=0.1)
    store = open_signal_store(stores["compact"], tok)

    def true_kl():
        with torch.no_grad():
            return float(token_kd_loss(student(blocks)[:, :-1], reference))

    before = true_kl()
    for _ in range(5):
        for batch in store.batches(3):
            loss = signal_kd_loss(student(batch["input_ids"]), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert true_kl() < 0.6 * before


# ------------------------------------------------------------------ DistillKit layout


def test_export_writes_distillkits_layout(stores, tok, tmp_path):
    out = export_distillkit(stores["compact"], tmp_path / "dk", rows_per_file=4)
    assert sorted(p.name for p in out.iterdir()) == ["compression_config.yaml", "data_0.parquet", "data_1.parquet",
                                                     "kdkit_signal.json"]
    schema = pq.read_schema(out / "data_0.parquet")
    assert str(schema.field("input_ids").type) == "list<element: uint64>"
    for name in ("compressed_logprobs", "bytepacked_indices"):
        assert str(schema.field(name).type) == "list<element: list<element: uint8>>"
    import yaml

    cfg = yaml.safe_load((out / "compression_config.yaml").read_text())
    assert (cfg["d"], cfg["k"], cfg["exact_k"], cfg["exact_dtype"]) == (V, 64, 64, "float16")
    row = pq.read_table(out / "data_0.parquet").slice(0, 1).to_pylist()[0]
    assert len(row["input_ids"]) == L and len(row["compressed_logprobs"]) == L - 1
    assert len(row["compressed_logprobs"][0]) == 128 and len(row["bytepacked_indices"][0]) == 128  # 64 x 16 bits
    side = json.loads((out / "kdkit_signal.json").read_text())
    assert side["tokenizer_fingerprint"] == open_signal_store(stores["compact"]).meta["tokenizer_fingerprint"]


def test_round_trip_plain_store(stores, tok, tmp_path):
    """plain fp16 top-64 -> DistillKit (float16 values) -> kdkit plain fp16: the same signal."""
    out = export_distillkit(stores["plain"], tmp_path / "dk")
    back = import_distillkit(out, tmp_path / "back", tok)
    a, b = _everything(stores["plain"], tok), _everything(back, tok)
    assert torch.equal(a["input_ids"], b["input_ids"])
    (ia, oa), (ib, ob) = a["indices"].sort(-1), b["indices"].sort(-1)  # values tied in fp16 may swap ranks
    assert torch.equal(ia, ib)
    va, vb = a["logprobs"].float().gather(-1, oa), b["logprobs"].float().gather(-1, ob)
    assert (va - vb).abs().max() <= 2**-10 * va.abs().max()  # a float16 step at most
    assert (va == vb).float().mean() > 0.95


def test_round_trip_compact_store(stores, tok, tmp_path):
    """compact -> DistillKit (float32 values) -> compact: the same codes, the tail mass within float16."""
    cfg = DistillKitCompression(d=V, k=64, exact_k=64, exact_dtype="float32", delta_encoding=False)
    out = export_distillkit(stores["compact"], tmp_path / "dk", cfg)
    rows = read_distillkit(out)
    a = _everything(stores["compact"], tok)
    assert torch.equal(rows.indices, a["indices"]) and torch.equal(rows.logprobs, a["logprobs"])
    back = import_distillkit(out, tmp_path / "back", tok, SignalSpec("topk", k=64, codec="compact"))
    b = _everything(back, tok)
    assert torch.equal(a["indices"].sort(-1).values, b["indices"].sort(-1).values)
    assert (a["logprobs"] - b["logprobs"]).abs().max() < 2e-3
    assert torch.allclose(a["tail_logmass"].float(), b["tail_logmass"].float(), rtol=2e-3)


def test_budget_export_and_raw_topk_rows_import(stores, tok, tmp_path, blocks):
    cfg = {"d": V, "k": 50, "exact_k": 1, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, "sqrt"],
           "term_dtype": "float32", "residual_bins": [], "delta_encoding": False}  # DistillKit's budget setting
    out = export_distillkit(stores["plain"], tmp_path / "budget", cfg)
    assert len(pq.read_table(out / "data_0.parquet").column("compressed_logprobs")[0][0]) == 2 + 12
    rows = read_distillkit(out)
    assert rows.indices.shape == (N, L - 1, 50)
    # DistillKit's raw top-k rows (token_ids, top_values), cut to as many tokens as positions by its packing
    import pyarrow as pa

    raw = tmp_path / "raw"
    raw.mkdir()
    a = _everything(stores["plain32"], tok)
    pq.write_table(pa.table({"input_ids": [r[:-1].tolist() for r in a["input_ids"]],
                             "token_ids": a["indices"].tolist(), "top_values": a["logprobs"].float().tolist()}),
                   raw / "data_0.parquet")
    got = read_distillkit(raw, vocab_size=V)
    assert got.blocks.shape == (N, L - 1) and torch.equal(got.indices, a["indices"][:, :-1])
    assert torch.equal(got.logprobs, a["logprobs"][:, :-1].float())


def test_import_checks_the_tokenizer_and_row_lengths(stores, tok, tmp_path):
    out = export_distillkit(stores["plain32"], tmp_path / "dk")
    side = json.loads((out / "kdkit_signal.json").read_text())
    (out / "kdkit_signal.json").write_text(json.dumps({**side, "tokenizer_fingerprint": "0" * 64}))
    with pytest.raises(TokenizerMismatchError, match="0000"):
        import_distillkit(out, tmp_path / "back", tok)
    (out / "kdkit_signal.json").write_text(json.dumps(side))
    with pytest.raises(ConfigError, match="temperature 1.0"):
        import_distillkit(out, tmp_path / "back2", tok, SignalSpec("topk", k=32, temperature=2.0))
    import pyarrow as pa

    ragged = tmp_path / "ragged"
    ragged.mkdir()
    pq.write_table(pa.table({"input_ids": [[1, 2, 3], [1, 2]], "token_ids": [[[1], [2]], [[1]]],
                             "top_values": [[[-0.1], [-0.2]], [[-0.1]]]}), ragged / "data_0.parquet")
    with pytest.raises(ConfigError, match="pack the rows to one length"):
        read_distillkit(ragged, vocab_size=10)
