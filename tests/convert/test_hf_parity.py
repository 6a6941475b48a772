"""HF <-> Megatron checkpoint conversion: logit parity at TP=1 / TP=2 / PP=2 and bit-exact round trips.

Two tiny random fp32 models: a Llama (GQA 4 heads / 2 KV heads, head_dim 16, untied, one safetensors
file) and a Qwen2 (q/k/v bias, tied embeddings, head_dim 24 != hidden/heads, vocab 120 -> padded
to 128, a sharded checkpoint with an index, a tokenizer). Each layout is one spawned job whose ranks
first convert both models (``convert_rank``, the body that ``hf_to_mcore`` runs on its own spawned
ranks) and then load the checkpoints into freshly built models (``checkpoint.load``; the Llama at TP=1
also through ``Trainer.load``) and compute logits with ``forward_logits``. The public entry points
are exercised by the CLI test (``tools/convert_checkpoint.py`` both ways, in subprocesses) and the
in-process ``mcore_to_hf`` round trip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
B, S = 2, 12
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
MODELS = ("llama", "qwen2")
TOL = 1e-4
MAX_DIFFS: dict = {}  # (model, layout) -> max abs logit diff (printed at the end of the module)


# --------------------------------------------------------------------------------------------
# HF side (this process)
# --------------------------------------------------------------------------------------------


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from HF's init (norms != 1, biases != 0), so every mapping matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.15 * noise)


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(11))


def _hf_logits(model, tokens) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def _read_all(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from megatron_kimi.data.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("hf")
    models = {}
    torch.manual_seed(0)
    llama_cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
                            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                            tie_word_embeddings=False, dtype="float32")
    qwen_cfg = Qwen2Config(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=24, vocab_size=120, max_position_embeddings=64,
                           rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                           dtype="float32")
    for name, cls, cfg, shard in (("llama", LlamaForCausalLM, llama_cfg, None),
                                  ("qwen2", Qwen2ForCausalLM, qwen_cfg, "60KB")):
        model = cls(cfg).float()
        _randomize(model, seed=len(name))
        path = root / name
        model.save_pretrained(str(path), **({"max_shard_size": shard} if shard else {}))
        tokens = _tokens(cfg.vocab_size)
        models[name] = SimpleNamespace(dir=path, tokens=tokens, logits=_hf_logits(model, tokens),
                                       vocab=cfg.vocab_size, tensors=_read_all(path),
                                       config=json.loads((path / "config.json").read_text()))
    tok = build_char_tokenizer(root / "char_tokenizer")
    for f in Path(tok).iterdir():
        shutil.copy2(f, models["qwen2"].dir / f.name)
    assert (models["qwen2"].dir / "model.safetensors.index.json").is_file()  # sharded input is covered
    assert not (models["llama"].dir / "model.safetensors.index.json").is_file()
    return models


# --------------------------------------------------------------------------------------------
# Megatron side (spawned ranks)
# --------------------------------------------------------------------------------------------


def _layout_body(rank, world_size, tp, pp, plans, inputs, with_trainer, also_load):
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.config import TrainConfig, build_config
    from megatron_kimi.convert.hf_to_mcore import convert_rank
    from megatron_kimi.model.builder import build_model_chunks, padded_vocab_size, transformer_config
    from megatron_kimi.training import checkpoint
    from megatron_kimi.training.lm_step import forward_logits, lm_forward_step
    from megatron_kimi.training.runtime import build_training_bundle, initialize, shutdown
    from megatron_kimi.training.trainer import Trainer

    initialize(next(iter(plans.values()))["train_config"])
    try:
        for plan in plans.values():
            convert_rank(plan)
        out = {}
        jobs = [(name, name, plan["out"]) for name, plan in plans.items()]
        jobs += [(label, name, root) for label, (name, root) in also_load.items()]  # saved at another layout
        for label, name, root in jobs:
            ckpt_dir = checkpoint.resolve(root)
            common = checkpoint.read_common(ckpt_dir)
            # The model section a user would copy (from the checkpoint), at this layout.
            cfg = build_config(TrainConfig, {
                "model": common["config"]["model"],
                "parallel": {"tensor": tp, "pipeline": pp},
                "training": {"seq_length": S, "micro_batch_size": B, "global_batch_size": B, "steps": 1},
            })
            m = cfg.model
            tokens = inputs[name]
            batch = {"tokens": tokens, "position_ids": torch.arange(S).unsqueeze(0).expand(B, S).contiguous()}
            chunks = build_model_chunks(m, transformer_config(m, cfg.parallel, cfg.precision),
                                        padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp))
            checkpoint.load(ckpt_dir, chunks)
            for c in chunks:
                c.eval()
            logits = forward_logits(chunks, [batch], S)
            out[label] = None if logits is None else logits[0][..., : m.vocab_size].clone()
            if with_trainer and label == "llama":
                bundle = build_training_bundle(cfg, m.vocab_size, 1)
                Trainer(bundle, lm_forward_step, S, B).load(ckpt_dir)  # contents == ["model"]: weights only
                for c in bundle.model:
                    c.eval()
                logits = forward_logits(bundle.model, [batch], S)
                out["llama/trainer"] = None if logits is None else logits[0][..., : m.vocab_size].clone()
        return out
    finally:
        shutdown()


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    from megatron_kimi.convert.hf_to_mcore import finish, prepare

    root = tmp_path_factory.mktemp("mcore")
    results, ckpts = {}, {}
    for layout, (tp, pp) in LAYOUTS.items():
        plans = {name: prepare(hf_models[name].dir, root / f"{name}_{layout}", tp=tp, pp=pp) for name in MODELS}
        inputs = {name: hf_models[name].tokens for name in MODELS}
        # PP=2 also loads the TP=2 conversion (resharding on load)
        also = {f"{n}/from_tp2": (n, root / f"{n}_tp2") for n in MODELS} if layout == "pp2" else {}
        per_rank = run_distributed(_layout_body, tp * pp, tp, pp, plans, inputs, layout == "tp1", also,
                                   timeout=300)
        merged = {}
        for r in per_rank:
            for k, v in r.items():
                if v is not None and k not in merged:
                    merged[k] = v
        results[layout] = merged
        for name, plan in plans.items():
            ckpts[(name, layout)] = finish(plan)
    return SimpleNamespace(logits=results, ckpts=ckpts, root=root)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model", MODELS)
def test_logit_parity(hf_models, converted, model, layout):
    ref = hf_models[model].logits
    assert ref.abs().max() > 1.0  # non-trivial logits
    got = converted.logits[layout][model]
    diff = _max_diff(got, ref)
    MAX_DIFFS[(model, layout)] = diff
    print(f"\n{model} {layout}: max abs logit diff {diff:.3g} (|logits| max {ref.abs().max():.3g})")
    assert diff <= TOL, f"{model} at {layout}: max abs logit diff {diff} > {TOL}"


def test_trainer_load_parity(hf_models, converted):
    diff = _max_diff(converted.logits["tp1"]["llama/trainer"], hf_models["llama"].logits)
    MAX_DIFFS[("llama", "tp1 via Trainer.load")] = diff
    assert diff <= TOL


@pytest.mark.parametrize("model", MODELS)
def test_tp2_checkpoint_loads_at_pp2(hf_models, converted, model):
    diff = _max_diff(converted.logits["pp2"][f"{model}/from_tp2"], hf_models[model].logits)
    MAX_DIFFS[(model, "tp2 ckpt loaded at pp2")] = diff
    assert diff <= TOL


def test_checkpoint_contents(hf_models, converted):
    import yaml

    from megatron_kimi.config import ModelConfig
    from megatron_kimi.training import checkpoint

    for (name, layout), ckpt_dir in converted.ckpts.items():
        root = ckpt_dir.parent
        assert (root / "latest").read_text().strip() == "iter_0000000"
        assert checkpoint.resolve(root) == ckpt_dir
        common = checkpoint.read_common(ckpt_dir)
        assert common["contents"] == ["model"] and "optimizer" not in common["contents"]
        tp, pp = LAYOUTS[layout]
        assert common["layout"]["tp"] == tp and common["layout"]["pp"] == pp
        assert common["hf"]["model_type"] == name
        assert common["hf_architecture"] == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[name]
        saved = ModelConfig(**common["config"]["model"])
        from_yaml = ModelConfig(**yaml.safe_load((root / "model_config.yaml").read_text())["model"])
        assert saved == from_yaml
        assert saved.vocab_size == hf_models[name].vocab and saved.tie_word_embeddings == (name == "qwen2")
        assert saved.add_qkv_bias == (name == "qwen2")
        assert (root / "tokenizer").is_dir() == (name == "qwen2")


# --------------------------------------------------------------------------------------------
# Back to HF
# --------------------------------------------------------------------------------------------


_CONFIG_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings",
                  "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act")


def _check_roundtrip(orig, out: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_kimi.convert.hf import rope_theta_of

    back = _read_all(out)
    assert sorted(back) == sorted(orig.tensors)
    for k, t in orig.tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), f"{k} differs after the round trip"
    cfg = json.loads((out / "config.json").read_text())
    for field in _CONFIG_FIELDS:
        assert cfg.get(field) == orig.config.get(field), field
    head_dim = orig.config.get("head_dim") or orig.config["hidden_size"] // orig.config["num_attention_heads"]
    assert cfg["head_dim"] == head_dim
    assert rope_theta_of(cfg) == rope_theta_of(orig.config)
    auto = AutoConfig.from_pretrained(str(out))
    assert auto.head_dim == head_dim and auto.tie_word_embeddings == orig.config["tie_word_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    diff = _max_diff(_hf_logits(model, orig.tokens), orig.logits)
    assert diff <= 1e-6, diff
    return cfg


def test_roundtrip_api_qwen2_from_pp2(hf_models, converted, tmp_path):
    from megatron_kimi.convert.mcore_to_hf import mcore_to_hf

    orig = hf_models["qwen2"]
    out = mcore_to_hf(converted.ckpts[("qwen2", "pp2")].parent, tmp_path / "qwen2_hf")  # root with `latest`
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert "lm_head.weight" not in _read_all(out)  # tied
    _check_roundtrip(orig, out)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out))("1+2=3")["input_ids"]


def _cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc


def test_cli_roundtrip_llama_tp2(hf_models, tmp_path):
    from megatron_kimi.training import checkpoint

    orig = hf_models["llama"]
    ckpt = tmp_path / "llama_mcore"
    proc = _cli("hf-to-mcore", "--hf-dir", orig.dir, "--out", ckpt, "--tp", 2, "--pp", 1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    common = checkpoint.read_common(checkpoint.resolve(ckpt))
    assert common["contents"] == ["model"] and common["layout"]["tp"] == 2
    out = tmp_path / "llama_hf"
    proc = _cli("mcore-to-hf", "--ckpt", ckpt / "iter_0000000", "--out", out, "--max-shard-size", "60KB")
    assert proc.returncode == 0, proc.stderr[-4000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and sorted(index["weight_map"]) == sorted(orig.tensors)
    assert "lm_head.weight" in index["weight_map"]  # untied
    _check_roundtrip(orig, out)
    # a second conversion into the same directory needs overwrite (checked before anything is spawned)
    from megatron_kimi.convert.hf_to_mcore import hf_to_mcore

    with pytest.raises(ValueError, match="overwrite"):
        hf_to_mcore(orig.dir, ckpt, tp=2)


# --------------------------------------------------------------------------------------------
# Pure mapping functions
# --------------------------------------------------------------------------------------------


def test_layout_functions_are_inverse():
    from megatron_kimi.convert import hf

    nq, ng, d, h = 8, 2, 4, 6
    q, k, v = torch.randn(nq * d, h), torch.randn(ng * d, h), torch.randn(ng * d, h)
    qkv = hf.interleave_qkv(q, k, v, nq, ng, d)
    # group g holds [q heads g*4..g*4+3, k head g, v head g]
    g1 = qkv.view(ng, (nq // ng + 2) * d, h)[1]
    assert torch.equal(g1[: 4 * d], q[4 * d: 8 * d]) and torch.equal(g1[4 * d: 5 * d], k[d:])
    assert torch.equal(g1[5 * d:], v[d:])
    assert all(torch.equal(a, b) for a, b in zip(hf.deinterleave_qkv(qkv, nq, ng, d), (q, k, v)))
    bias = [torch.randn(nq * d), torch.randn(ng * d), torch.randn(ng * d)]
    merged = hf.interleave_qkv(*bias, nq, ng, d)
    assert all(torch.equal(a, b) for a, b in zip(hf.deinterleave_qkv(merged, nq, ng, d), bias))
    gate, up = torch.randn(10, h), torch.randn(10, h)
    assert all(torch.equal(a, b) for a, b in zip(hf.split_gate_up(hf.merge_gate_up(gate, up)), (gate, up)))
    w = torch.randn(5, h)
    padded = hf.pad_vocab(w, 8)
    assert padded.shape == (8, h) and not padded[5:].any() and torch.equal(hf.unpad_vocab(padded, 5), w)

    for tied, bias_ in ((False, False), (True, True)):
        a = hf.Arch(num_layers=2, hidden_size=h, ffn_hidden_size=10, num_heads=nq, num_groups=ng, head_dim=d,
                    vocab_size=5, padded_vocab_size=8, qkv_bias=bias_, tied=tied)
        tensors = {n: torch.randn(s) for n, s in hf.hf_shapes(a).items()}
        rebuilt = {}
        for name in hf.megatron_names(a):
            full = hf.megatron_from_hf(name, tensors.__getitem__, a)
            layer, key = hf.split_layer_name(name)
            shape, _ = hf.megatron_shapes(a)[name if layer is None else f"decoder.layers.{key}"]
            assert tuple(full.shape) == tuple(shape), name
            if name.endswith("linear_qkv.weight"):
                p = f"model.layers.{layer}.self_attn."
                assert torch.equal(full, hf.interleave_qkv(tensors[p + "q_proj.weight"], tensors[p + "k_proj.weight"],
                                                           tensors[p + "v_proj.weight"], nq, ng, d))
            rebuilt.update(hf.hf_from_megatron(name, full, a))
        assert sorted(rebuilt) == sorted(tensors)
        assert all(torch.equal(rebuilt[n], tensors[n]) for n in tensors)


def test_config_mapping_roundtrip(hf_models):
    from megatron_kimi.convert import hf

    for name in MODELS:
        orig = hf_models[name].config
        m = hf.model_config_from_hf(orig)
        back = hf.hf_config_from_model_config(m, name, m.vocab_size, base=orig)
        assert hf.model_config_from_hf(back) == m
    assert hf.parse_size("2GB") == 2 * 10**9 and hf.parse_size("1GiB") == 2**30 and hf.parse_size(123) == 123


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _copy_hf(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(hf_dir: Path, **changes) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(hf_dir: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_models, tmp_path):
    from megatron_kimi.convert.hf_to_mcore import hf_to_mcore

    d = _copy_hf(hf_models["llama"].dir, tmp_path / "hf")
    _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    name = r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"
    with pytest.raises(ValueError, match=name + r".*model\.safetensors"):
        hf_to_mcore(d, tmp_path / "out")


def test_missing_tensor_in_sharded_checkpoint_is_named(hf_models, tmp_path):
    from megatron_kimi.convert.hf_to_mcore import hf_to_mcore

    d = _copy_hf(hf_models["qwen2"].dir, tmp_path / "hf")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    fname = index["weight_map"].pop("model.layers.0.self_attn.k_proj.bias")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.bias.*" + fname.replace(".", r"\.")):
        hf_to_mcore(d, tmp_path / "out")


def test_shape_mismatch_is_named(hf_models, tmp_path):
    from megatron_kimi.convert.hf_to_mcore import hf_to_mcore

    d = _copy_hf(hf_models["llama"].dir, tmp_path / "hf")
    _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(48, 64)}))
    name = r"model\.layers\.0\.self_attn\.k_proj\.weight"
    with pytest.raises(ValueError, match=name + r".*model\.safetensors.*shape \[48, 64\]"):
        hf_to_mcore(d, tmp_path / "out")


def test_unexpected_tensor_is_named(hf_models, tmp_path):
    from megatron_kimi.convert.hf_to_mcore import hf_to_mcore

    d = _copy_hf(hf_models["llama"].dir, tmp_path / "hf")
    _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.o_proj\.bias'"):
        hf_to_mcore(d, tmp_path / "out")


@pytest.mark.parametrize("changes, field", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_llama_config_names_the_field(hf_models, tmp_path, changes, field):
    from megatron_kimi.convert.hf_to_mcore import hf_to_mcore

    d = _copy_hf(hf_models["llama"].dir, tmp_path / "hf")
    _edit_config(d, **changes)
    with pytest.raises(ValueError, match=rf"{field}="):
        hf_to_mcore(d, tmp_path / "out")


def test_qwen2_sliding_window_names_the_field(hf_models):
    from megatron_kimi.convert import hf

    cfg = dict(hf_models["qwen2"].config, use_sliding_window=True, sliding_window=16)
    with pytest.raises(ValueError, match="use_sliding_window="):
        hf.model_config_from_hf(cfg)
    cfg = dict(hf_models["qwen2"].config, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match="layer_types="):
        hf.model_config_from_hf(cfg)


def test_report_max_diffs():
    """Summary line (run last in this module): the parity numbers per layout."""
    if MAX_DIFFS:
        items = sorted(MAX_DIFFS.items())
        print("\nmax abs logit diff vs HF: " + ", ".join(f"{m}/{lay}: {d:.2e}" for (m, lay), d in items))
