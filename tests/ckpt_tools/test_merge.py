"""Model merging (tools/merge_checkpoints.py, megatron_kimi/ckpt_tools/merge.py) on tiny real checkpoints.

Three tiny random fp32 Llamas as HF directories (``save_pretrained``): A and B of one architecture, C
with another hidden size. One spawned 2-rank job converts them with the converter's rank body
(``convert_rank``, what ``hf-to-mcore`` runs): A and C at TP=2, B at TP=1/PP=2, so the Megatron inputs
are saved at different layouts by the real save path. Merged tensors are compared with full loads of
the inputs (every tensor at its global shape); the end-to-end checks load a merge into the trainer on
2 ranks (its logits = the logits of the HF model whose weights are the average) and export it with
``mcore-to-hf`` (bit-equal to merging the HF directories directly).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_kimi.ckpt_tools import merge as merge_mod
from megatron_kimi.ckpt_tools import merge_hf as merge_hf_mod
from megatron_kimi.ckpt_tools.merge import MergeError, merge
from tests.checkpoints import global_tensors
from tests.convert.test_hf_parity import _hf_logits, _randomize, _read_all
from tests.dist import run_distributed

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
W = 0.3  # weight of A; B gets 1 - W
B_, S_ = 2, 12  # batch, sequence for the logits
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=128, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
SAVED_AT = {"a": (2, 1), "b": (1, 2), "c": (2, 1)}  # (tp, pp) each Megatron input is saved at
FP32_ULP = 2.0 ** -23


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to the last bit of the cast (fp64 accumulation, then one rounding to fp32)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=2 * FP32_ULP, atol=1e-30, msg=lambda m: f"{what}: {m}")


def _average(tensors, weights):
    acc = sum(w * t.double() for t, w in zip(tensors, weights))
    return acc.to(tensors[0].dtype)


def _storage_layout(ckpt: Path) -> set:
    """{(tensor key, chunk offsets, writing rank)} of a torch_dist checkpoint (RNG state left out)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt)).read_metadata()
    return {(i.fqn, None if i.offset is None else tuple(i.offset), s.relative_path.split("_")[2])
            for i, s in meta.storage_data.items() if not i.fqn.startswith("rng_state")}


# --------------------------------------------------------------------------------------------
# Fixtures: HF directories, and their conversions at different layouts (one spawned job)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_kimi.data.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("merge-hf")
    out = SimpleNamespace(root=root, dirs={}, tensors={}, config=None)
    for name, seed, changes in (("a", 1, {}), ("b", 2, {}), ("c", 3, {"hidden_size": 96})):
        cfg = LlamaConfig(**{**LLAMA, **changes}, dtype="float32")
        model = LlamaForCausalLM(cfg).float()
        _randomize(model, seed)
        model.save_pretrained(str(root / name))
        out.dirs[name] = root / name
        out.tensors[name] = _read_all(root / name)
    tok = build_char_tokenizer(root / "tok")
    for f in Path(tok).iterdir():
        shutil.copy2(f, out.dirs["a"] / f.name)
    out.config = LlamaConfig(**LLAMA, dtype="float32")
    out.tokens = torch.randint(0, LLAMA["vocab_size"], (B_, S_), generator=torch.Generator().manual_seed(5))
    return out


def _hf_model(config, tensors: dict):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config).float()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


def _convert_body(rank, world_size, jobs):
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron.core import parallel_state

    from megatron_kimi.convert.hf_to_mcore import convert_rank
    from megatron_kimi.training.runtime import initialize, shutdown

    initialize(jobs[0][0]["train_config"])
    try:
        for i, plans in enumerate(jobs):
            if i:  # another layout in the same process group
                p = plans[0]["train_config"].parallel
                parallel_state.destroy_model_parallel()
                parallel_state.initialize_model_parallel(tensor_model_parallel_size=p.tensor,
                                                         pipeline_model_parallel_size=p.pipeline)
            for plan in plans:
                convert_rank(plan)
    finally:
        shutdown()
    return True


@pytest.fixture(scope="module")
def mcore(hf, tmp_path_factory):
    """{name: checkpoint root} of A (TP2), B (TP1/PP2), C (TP2, hidden 96), each a real converter save."""
    from megatron_kimi.convert.hf_to_mcore import finish, prepare

    root = tmp_path_factory.mktemp("merge-mcore")
    plans = {n: prepare(hf.dirs[n], root / n, tp=tp, pp=pp) for n, (tp, pp) in SAVED_AT.items()}
    run_distributed(_convert_body, 2, [[plans["a"], plans["c"]], [plans["b"]]], timeout=240)
    ckpts = {n: finish(plan).parent for n, plan in plans.items()}
    for n, (tp, pp) in SAVED_AT.items():  # really saved at different layouts
        layout = torch.load(ckpts[n] / "iter_0000000" / "common.pt", weights_only=False)["layout"]
        assert (layout["tp"], layout["pp"]) == (tp, pp), (n, layout)
    full = {n: global_tensors(ckpts[n] / "iter_0000000") for n in ("a", "b")}
    return SimpleNamespace(root=root, ckpts=ckpts, full=full)


@pytest.fixture(scope="module")
def merged(mcore, tmp_path_factory):
    """A (TP2) and B (PP2) merged with weights W, 1 - W at TP1/PP2."""
    out = tmp_path_factory.mktemp("merged") / "m"
    return merge([mcore.ckpts["a"], mcore.ckpts["b"]], out, [W, 1 - W], tp=1, pp=2)


# --------------------------------------------------------------------------------------------
# (e) Hugging Face directories (first: they need no spawned ranks)
# --------------------------------------------------------------------------------------------


def test_hf_directories_merge_into_a_loadable_sharded_hf_directory(hf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge([hf.dirs["a"], hf.dirs["b"]], tmp_path / "m", [0.25, 0.75], max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert sorted(index["weight_map"]) == sorted(hf.tensors["a"])
    got = _read_all(out)
    for k, t in hf.tensors["a"].items():
        _close(got[k], _average([t, hf.tensors["b"][k]], (0.25, 0.75)), k)
    assert json.loads((out / "config.json").read_text()) == json.loads((hf.dirs["a"] / "config.json").read_text())
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "merge_info.json").read_text())["weights"] == [0.25, 0.75]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    want = _hf_logits(_hf_model(hf.config, {k: _average([t, hf.tensors["b"][k]], (0.25, 0.75))
                                           for k, t in hf.tensors["a"].items()}), hf.tokens)
    assert torch.equal(_hf_logits(model, hf.tokens), want)
    assert AutoTokenizer.from_pretrained(str(out))("1+2=3")["input_ids"]
    # self-merge: bit-identical
    same = _read_all(merge([hf.dirs["a"], hf.dirs["a"]], tmp_path / "same", [0.5, 0.5]))
    assert sorted(same) == sorted(hf.tensors["a"])
    assert all(torch.equal(same[k], t) for k, t in hf.tensors["a"].items())
    # another architecture: the config.json field is named
    with pytest.raises(ValueError, match=r"config\.json field 'hidden_size' is 64 in input 1 .* but 96 in input 2"):
        merge([hf.dirs["a"], hf.dirs["c"]], tmp_path / "o")
    with pytest.raises(ValueError, match=r"--tp/--pp apply to Megatron checkpoints"):
        merge([hf.dirs["a"], hf.dirs["b"]], tmp_path / "o", tp=2)


def test_dtype_mismatch_needs_dtype(hf, tmp_path):
    from safetensors.torch import save_file

    bf = tmp_path / "b_bf16"
    shutil.copytree(hf.dirs["b"], bf)
    save_file({k: v.bfloat16() for k, v in _read_all(hf.dirs["b"]).items()}, str(bf / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor '.*' has different dtypes \(F32 in input 1 .*, BF16 in input 2"):
        merge([hf.dirs["a"], bf], tmp_path / "o")
    out = merge([hf.dirs["a"], bf], tmp_path / "o", dtype="bf16")
    got = _read_all(out)
    k = "model.layers.1.mlp.up_proj.weight"
    want = (0.5 * hf.tensors["a"][k].double() + 0.5 * hf.tensors["b"][k].bfloat16().double()).bfloat16()
    assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# --------------------------------------------------------------------------------------------
# (f) streaming: one input tensor at a time, never a model
# --------------------------------------------------------------------------------------------


class _Spy:
    """Watches every tensor the inputs hand out (``cls.read``). At each read it records how many tensors
    read earlier are still alive: of the same input (``same_input_max``) and of all inputs (``live_max``)."""

    def __init__(self, monkeypatch, cls, method="read"):
        self.live_max = 0
        self.same_input_max = 0
        self.numels = []
        self._refs = {}
        orig = getattr(cls, method)

        def spy(inp, *args, **kwargs):
            alive = {k: [r for r in refs if r() is not None] for k, refs in self._refs.items()}
            self.same_input_max = max(self.same_input_max, len(alive.get(id(inp), [])))
            self.live_max = max(self.live_max, sum(len(v) for v in alive.values()))
            t = orig(inp, *args, **kwargs)
            self._refs = alive
            self._refs.setdefault(id(inp), []).append(weakref.ref(t))
            self.numels.append(t.numel())
            return t

        monkeypatch.setattr(cls, method, spy)


def _no_whole_file_loads(monkeypatch):
    import safetensors.torch

    def refuse(*a, **k):
        raise AssertionError("a whole safetensors file was loaded")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)


def test_hf_merge_streams_one_tensor_at_a_time(hf, tmp_path, monkeypatch):
    _no_whole_file_loads(monkeypatch)
    spy = _Spy(monkeypatch, merge_hf_mod.HfInput)
    saved = []
    import safetensors.torch

    orig_save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda tensors, path, metadata=None: (saved.append(sum(t.numel() * t.element_size()
                                                                                for t in tensors.values())),
                                                              orig_save(tensors, path, metadata=metadata))[1])
    merge([hf.dirs["a"], hf.dirs["b"]], tmp_path / "m", [0.5, 0.5], max_shard_size="40KB")
    sizes = {k: t.numel() for k, t in hf.tensors["a"].items()}
    assert spy.same_input_max == 0 and spy.live_max <= 1
    assert max(spy.numels) == max(sizes.values()) and sum(spy.numels) == 2 * sum(sizes.values())
    largest = max(sizes.values()) * 4
    assert len(saved) > 3 and max(saved) <= max(40_000, largest)  # one output file buffered at a time


# --------------------------------------------------------------------------------------------
# (a) weighted average across layouts, (b) self-merge
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inputs, weights, out_layout", [
    (("a", "b"), (W, 1 - W), (1, 1)),
    (("a", "b"), (W, 1 - W), (2, 1)),
    (("b", "a"), (0.75, 0.25), (1, 2)),
    (("a", "b", "a"), (0.2, 0.5, 0.3), (2, 2)),
])
def test_merge_is_the_weighted_average_at_any_layout(mcore, tmp_path, inputs, weights, out_layout):
    from megatron_kimi.ckpt_tools.inspect import inspect_checkpoint
    from megatron_kimi.training import checkpoint

    tp, pp = out_layout
    final = merge([mcore.ckpts[n] for n in inputs], tmp_path / "m", list(weights), tp=tp, pp=pp)
    assert final == tmp_path / "m" / "iter_0000000"
    assert checkpoint.resolve(tmp_path / "m") == final  # `latest`
    got = global_tensors(final)
    want_keys = sorted(k for k in mcore.full["a"] if not k.startswith("optimizer."))
    assert sorted(got) == want_keys
    for k in want_keys:
        _close(got[k], _average([mcore.full[n][k] for n in inputs], weights), k)
    # a fresh, weights-only checkpoint at the requested layout, loadable by the tools
    info = inspect_checkpoint(tmp_path / "m")
    assert info.layout == {"tp": tp, "pp": pp, "cp": 1, "dp": 1} and info.step == 0
    assert info.contents == ["model"] and info.optimizer_kind is None
    assert info.config["parallel"]["tensor"] == tp and info.config["parallel"]["pipeline"] == pp
    assert info.config["model"] == checkpoint.read_common(mcore.ckpts["a"] / "iter_0000000")["config"]["model"]
    common = checkpoint.read_common(final)
    assert [m["weight"] for m in common["merged_from"]] == list(weights)
    # the first input's HF record (architecture, tokenizer: only A's HF directory has one)
    assert common["hf"]["model_type"] == "llama"
    assert common["hf"]["tokenizer_dir"] == ("tokenizer" if inputs[0] == "a" else None)
    assert (tmp_path / "m" / "tokenizer" / "tokenizer.json").is_file() == (inputs[0] == "a")
    assert (tmp_path / "m" / "model_config.yaml").is_file()
    # the chunks and the files that hold them are those of a real save at that layout
    for name, layout in SAVED_AT.items():
        if name in ("a", "b") and layout == out_layout:
            assert _storage_layout(final) == _storage_layout(mcore.ckpts[name] / "iter_0000000")


def test_merging_a_checkpoint_with_itself_is_bit_identical(mcore, tmp_path):
    a = mcore.ckpts["a"] / "iter_0000000"
    final = merge([a, a], tmp_path / "self", [0.5, 0.5])  # output layout: the first input's (TP2)
    got, want = global_tensors(final), mcore.full["a"]
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert _storage_layout(final) == _storage_layout(a)
    # the non-tensor entries (the layers' _extra_state) are copied byte for byte
    from torch.distributed.checkpoint import FileSystemReader

    src, dst = merge_mod.McoreInput(a, "a"), merge_mod.McoreInput(final, "m")
    assert src.objects and sorted(src.objects) == sorted(dst.objects)
    assert all(src.read_object(k) == dst.read_object(k) for k in src.objects)
    assert FileSystemReader(str(final)).read_metadata().state_dict_metadata.keys() >= set(src.objects)
    # --dtype: one rounding of the exact average
    bf = global_tensors(merge([a, a], tmp_path / "bf16", [0.5, 0.5], dtype="bf16", tp=1, pp=1))
    for k in want:
        assert bf[k].dtype == torch.bfloat16 and torch.equal(bf[k], want[k].bfloat16()), k


# --------------------------------------------------------------------------------------------
# (c) end to end: the trainer loads the merge; mcore-to-hf exports it
# --------------------------------------------------------------------------------------------


def _trainer_body(rank, world_size, ckpt_dir, tokens, tp, pp):
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.config import TrainConfig, build_config
    from megatron_kimi.training import checkpoint
    from megatron_kimi.training.lm_step import forward_logits, lm_forward_step
    from megatron_kimi.training.runtime import build_training_bundle, initialize, shutdown
    from megatron_kimi.training.trainer import Trainer

    common = checkpoint.read_common(ckpt_dir)
    cfg = build_config(TrainConfig, {
        "model": common["config"]["model"],
        "parallel": {"tensor": tp, "pipeline": pp},
        "training": {"seq_length": S_, "micro_batch_size": B_, "global_batch_size": B_, "steps": 1},
    })
    initialize(cfg)
    try:
        bundle = build_training_bundle(cfg, cfg.model.vocab_size, 1)
        trainer = Trainer(bundle, lm_forward_step, S_, B_)
        resumed = trainer.load(ckpt_dir)  # what `checkpoint.load=D` of sft / rl does
        for c in bundle.model:
            c.eval()
        batch = {"tokens": tokens, "position_ids": torch.arange(S_).unsqueeze(0).expand(B_, S_).contiguous()}
        logits = forward_logits(bundle.model, [batch], S_)
        vocab = cfg.model.vocab_size
        return resumed, trainer.state.step, None if logits is None else logits[0][..., :vocab].clone()
    finally:
        shutdown()


def test_merged_checkpoint_loads_into_the_trainer_with_the_average_models_logits(hf, merged):
    results = run_distributed(_trainer_body, 2, merged, hf.tokens, 1, 2, timeout=240)
    assert all(r[0] is False and r[1] == 0 for r in results)  # a weights-only start, not a resume
    logits = next(r[2] for r in results if r[2] is not None)
    avg = {k: _average([hf.tensors["a"][k], hf.tensors["b"][k]], (W, 1 - W)) for k in hf.tensors["a"]}
    want = _hf_logits(_hf_model(hf.config, avg), hf.tokens)
    diff = (logits.double() - want.double()).abs().max().item()
    assert diff <= 1e-4, diff
    for name in ("a", "b"):  # and not either input's model
        other = _hf_logits(_hf_model(hf.config, hf.tensors[name]), hf.tokens)
        assert (logits.double() - other.double()).abs().max().item() > 100 * 1e-4


def test_merged_checkpoint_exports_to_hf_like_merging_the_hf_dirs(hf, merged, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_kimi.convert.mcore_to_hf import mcore_to_hf

    exported = mcore_to_hf(merged.parent, tmp_path / "exported")
    direct = merge([hf.dirs["a"], hf.dirs["b"]], tmp_path / "direct", [W, 1 - W])
    x, y = _read_all(exported), _read_all(direct)
    assert sorted(x) == sorted(y) == sorted(hf.tensors["a"])
    for k in x:
        assert torch.equal(x[k], y[k]), k
    assert (exported / "tokenizer.json").is_file()  # found through the merged checkpoint's HF record
    model = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    avg = {k: _average([hf.tensors["a"][k], hf.tensors["b"][k]], (W, 1 - W)) for k in hf.tensors["a"]}
    want = _hf_logits(_hf_model(hf.config, avg), hf.tokens)
    assert (_hf_logits(model, hf.tokens) - want).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------------
# (d) refused inputs and arguments
# --------------------------------------------------------------------------------------------


def _patched_copy(src_root: Path, dst: Path, edit) -> Path:
    shutil.copytree(src_root / "iter_0000000", dst)
    common = torch.load(dst / "common.pt", weights_only=False)
    edit(common)
    torch.save(common, dst / "common.pt")
    return dst


def test_mismatched_architectures_name_the_field_or_tensor(mcore, tmp_path):
    a, c = mcore.ckpts["a"], mcore.ckpts["c"]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model\.hidden_size is 64 in input 1 .* but 96 in input 2"):
        merge([a, c], out)
    # the same config, but the tensors of the other model: the tensor and both shapes are named
    a_model = torch.load(a / "iter_0000000" / "common.pt", weights_only=False)["config"]["model"]
    c_as_a = _patched_copy(c, tmp_path / "c_as_a", lambda cm: cm["config"].__setitem__("model", dict(a_model)))
    with pytest.raises(ValueError, match=r"tensor 'embedding\.word_embeddings\.weight' has shape \[128, 64\] in "
                                         r"input 1 .* but \[128, 96\] in input 2"):
        merge([a, c_as_a], out)
    deeper = _patched_copy(mcore.ckpts["b"], tmp_path / "b4", lambda cm: cm["config"]["model"].update(num_layers=4))
    with pytest.raises(ValueError, match=r"model\.num_layers is 2 in input 1 .* but 4 in input 2"):
        merge([a, deeper], out)
    with pytest.raises(ValueError, match=r"Hugging Face directories .* with Megatron checkpoints .*: convert first"):
        merge([a, _hf_dir_of(mcore)], out)  # A's own HF source
    with pytest.raises(ValueError, match=r"model\.num_attention_heads=4 is not divisible by parallel\.tensor=3"):
        merge([a, mcore.ckpts["b"]], out, tp=3)
    assert not out.exists()  # refused before anything is written


def _hf_dir_of(mcore) -> Path:
    from megatron_kimi.training import checkpoint

    return Path(checkpoint.read_common(mcore.ckpts["a"] / "iter_0000000")["hf"]["source_dir"])


def test_weights_are_checked(mcore, hf, tmp_path, capsys):
    a, b = mcore.ckpts["a"], mcore.ckpts["b"]
    with pytest.raises(MergeError, match=r"sum to 0\.9, not 1 \(pass --allow-unnormalized"):
        merge([a, b], tmp_path / "o", [0.5, 0.4])
    with pytest.raises(ValueError, match=r"3 weights for 2 inputs"):
        merge([a, b], tmp_path / "o", [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"1 weights for 2 inputs"):
        merge([hf.dirs["a"], hf.dirs["b"]], tmp_path / "o", [1.0])
    assert not (tmp_path / "o").exists()
    # unnormalized on request: task-vector style sums
    final = merge([a, b], tmp_path / "sum", [1.0, 1.0], allow_unnormalized=True)
    key = "decoder.layers.mlp.linear_fc1.weight"
    _close(global_tensors(final)[key], _average([mcore.full["a"][key], mcore.full["b"][key]], (1.0, 1.0)), key)
    # default weights: the mean; the command line's error path (exit 2, the message)
    assert merge_mod.main([str(a), str(b), "--out", str(tmp_path / "cli"), "--weights", "0.6", "0.6"]) == 2
    assert "sum to 1.2" in capsys.readouterr().err
    assert merge_mod.main([str(a), str(b), "--out", str(tmp_path / "cli")]) == 0
    mean = global_tensors(tmp_path / "cli" / "iter_0000000")[key]
    _close(mean, _average([mcore.full["a"][key], mcore.full["b"][key]], (0.5, 0.5)), key)
    # an existing output needs --force
    assert merge_mod.main([str(a), str(b), "--out", str(tmp_path / "cli")]) == 2
    assert "--force" in capsys.readouterr().err
    assert merge_mod.main([str(a), str(b), "--out", str(tmp_path / "cli"), "--force", "--weights", "1", "0"]) == 0
    assert torch.equal(global_tensors(tmp_path / "cli" / "iter_0000000")[key], mcore.full["a"][key])


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def test_command_line_tool(mcore, tmp_path):
    a, b = mcore.ckpts["a"], mcore.ckpts["b"]
    proc = subprocess.run([sys.executable, "tools/merge_checkpoints.py", str(a), str(b), "--weights", "0.5", "0.5",
                           "--out", str(tmp_path / "d"), "--tp", "1", "--pp", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {tmp_path / 'd' / 'iter_0000000'}" in proc.stdout
    common = torch.load(tmp_path / "d" / "iter_0000000" / "common.pt", weights_only=False)
    assert common["layout"]["pp"] == 2 and common["contents"] == ["model"]


# (f) the Megatron path streams too


def test_megatron_merge_streams_one_unit_at_a_time(mcore, tmp_path, monkeypatch):
    spy = _Spy(monkeypatch, merge_mod.McoreInput)
    writes = []
    orig_write = merge_mod.DcpWriter.write_chunk
    monkeypatch.setattr(merge_mod.DcpWriter, "write_chunk",
                        lambda self, rank, key, offs, data: (writes.append(data.numel()),
                                                             orig_write(self, rank, key, offs, data))[1])
    merge([mcore.ckpts["a"], mcore.ckpts["b"], mcore.ckpts["a"]], tmp_path / "m", [0.2, 0.3, 0.5], tp=2, pp=2)
    full = mcore.full["a"]
    model_numel = sum(t.numel() for t in full.values())
    largest_unit = max(t[0].numel() if k.startswith("decoder.layers.") else t.numel() for k, t in full.items())
    # at most one tensor per input at a time (this implementation: one in all, the accumulator aside)
    assert spy.same_input_max == 0 and spy.live_max <= 2
    assert max(spy.numels) == largest_unit < model_numel // 4  # a unit (one layer of one tensor), never more
    assert sum(spy.numels) == 3 * model_numel  # every element of every input read exactly once
    assert sum(writes) == model_numel and max(writes) <= largest_unit
