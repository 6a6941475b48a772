"""Kimi-K2.5 (vision tower + projector + Llama / Qwen2 text) <-> Megatron VLM checkpoints.

Two tiny random fp32 HF ``Kimi_K25ForConditionalGeneration`` models, saved with ``save_pretrained``
(transformers' own names: ``save_original_format=False``, see ``megatron_kimi/convert/kimi_k25.py``):

* ``qwen2``: Qwen2 text (hidden 64, 2 layers, GQA 4/2 heads of 16, q/k/v bias, vocab 128, untied),
  tower hidden 32, 2 layers, 2 heads, ffn 48, position grid 8; converted at TP=1 and TP=2;
* ``llama``: Llama text (vocab 120 -> padded, tied by the top-level flag while ``text_config`` says
  untied, image token id outside the vocabulary), converted at TP=1.

One spawned job per layout converts (``convert_rank``: the body ``hf_to_mcore`` runs on its ranks),
loads the checkpoints into freshly built models (``checkpoint.load``) and computes (a) the tower's
merged output and (b) the logits of a micro-batch with 3 images of different grids (``forward_logits``,
vocab-parallel logits gathered), compared with HF. Then (c) ``mcore_to_hf`` round trips: bit-identical
tensors, equal configs, ``from_pretrained`` works; and the CLI both ways in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.convert.test_hf_parity import _max_diff, _read_all
from tests.dist import run_distributed

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
GRID = [[1, 4, 6], [1, 2, 2], [1, 6, 4]]  # (t, h, w) in patches: 24 + 4 + 24 patches -> 6 + 1 + 6 tokens
S, OFFSET = 24, 3  # sequence length; the image placeholders start at this position
TOWER_TOL, LOGIT_TOL = 1e-5, 1e-4
LAYOUTS = {"tp1": (1, 1, ("qwen2", "llama")), "tp2": (2, 1, ("qwen2",)), "pp2": (1, 2, ("qwen2",))}
MAX_DIFFS: dict = {}  # (model, layout, what) -> max abs diff


# --------------------------------------------------------------------------------------------
# HF side (this process)
# --------------------------------------------------------------------------------------------


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """As test_hf_parity's: weights far from HF's init (every norm's weight near 1, not only "*norm.weight")."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.15 * noise)


def _k25(kind: str):
    from transformers import LlamaConfig, Qwen2Config
    from transformers.models.kimi_k25 import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    if kind == "qwen2":
        text = Qwen2Config(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
                           rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        top = dict(image_token_id=120, tie_word_embeddings=False, projection_layer_norm_eps=1e-5)
    else:
        text = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=120, max_position_embeddings=64,
                           rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                           tie_word_embeddings=False)
        top = dict(image_token_id=125, tie_word_embeddings=True, projection_layer_norm_eps=1e-6)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  pos_emb_height=8, pos_emb_width=8, rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    cfg = Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=32, **top)
    torch.manual_seed(0)
    model = Kimi_K25ForConditionalGeneration(cfg).float().eval()
    _randomize(model, seed=len(kind))
    return model


def _inputs(kind: str, image_token_id: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(7 + len(kind))
    grid = torch.tensor(GRID)
    patches = int(grid.prod(-1).sum())
    ids = torch.randint(0, 100, (1, S), generator=g)
    ids[0, OFFSET:OFFSET + patches // 4] = image_token_id
    return SimpleNamespace(pix=torch.randn(patches, 3, 14, 14, generator=g), grid=grid, ids=ids)


def _hf_outputs(model, x):
    with torch.no_grad():
        tower = model.model.vision_tower(x.pix, grid_thw=x.grid).pooler_output
        logits = model(input_ids=x.ids, pixel_values=x.pix, image_grid_thw=x.grid).logits.float()
    return tower, logits


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("k25")
    models = {}
    for kind in ("qwen2", "llama"):
        model = _k25(kind)
        path = root / kind
        model.save_pretrained(str(path), save_original_format=False)
        x = _inputs(kind, model.config.image_token_id)
        tower, logits = _hf_outputs(model, x)
        models[kind] = SimpleNamespace(dir=path, inputs=x, tower=tower, logits=logits, model=model,
                                       vocab=model.config.text_config.vocab_size, tensors=_read_all(path),
                                       config=json.loads((path / "config.json").read_text()))
    assert "lm_head.weight" in models["qwen2"].tensors and "lm_head.weight" not in models["llama"].tensors
    return models


# --------------------------------------------------------------------------------------------
# Megatron side (spawned ranks)
# --------------------------------------------------------------------------------------------


def _layout_body(rank, world_size, tp, pp, plans, inputs):
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.config import TrainConfig, build_config
    from megatron_kimi.convert.hf_to_mcore import convert_rank
    from megatron_kimi.model.builder import build_model_chunks, padded_vocab_size, transformer_config
    from megatron_kimi.model.sharding import unwrap
    from megatron_kimi.model.vision.vlm import ImageInputs
    from megatron_kimi.training import checkpoint
    from megatron_kimi.training.lm_step import forward_logits
    from megatron_kimi.training.runtime import initialize, shutdown

    initialize(next(iter(plans.values()))["train_config"])
    try:
        out = {}
        for name, plan in plans.items():
            convert_rank(plan)
            ckpt_dir = checkpoint.resolve(plan["out"])
            common = checkpoint.read_common(ckpt_dir)
            cfg = build_config(TrainConfig, {  # the model section a user would copy, at this layout
                "model": common["config"]["model"],
                "parallel": {"tensor": tp, "pipeline": pp},
                "training": {"seq_length": S, "micro_batch_size": 1, "global_batch_size": 1, "steps": 1},
            })
            m = cfg.model
            padded = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
            chunks = build_model_chunks(m, transformer_config(m, cfg.parallel, cfg.precision), padded)
            checkpoint.load(ckpt_dir, chunks)
            for c in chunks:
                c.eval()
            x = inputs[name]
            first = unwrap(chunks[0])
            assert hasattr(first, "vision_model") == first.pre_process  # the tower: first stage only
            with torch.no_grad():
                tower = first.vision_model(x.pix, x.grid).clone() if first.pre_process else None
            batch = {"tokens": x.ids, "position_ids": torch.arange(S).unsqueeze(0),
                     "images": ImageInputs(x.pix, x.grid)}
            logits = forward_logits(chunks, [batch], S)
            logits = None if logits is None else logits[0]
            out[name] = (tower, None if logits is None else logits[..., : m.vocab_size].clone(),
                         None if logits is None else logits.shape[-1] == padded)
        return out
    finally:
        shutdown()


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    from megatron_kimi.convert.hf_to_mcore import finish, prepare

    root = tmp_path_factory.mktemp("k25_mcore")
    results, ckpts = {}, {}
    for layout, (tp, pp, kinds) in LAYOUTS.items():
        plans = {k: prepare(hf_models[k].dir, root / f"{k}_{layout}", tp=tp, pp=pp) for k in kinds}
        inputs = {k: hf_models[k].inputs for k in kinds}
        per_rank = run_distributed(_layout_body, tp * pp, tp, pp, plans, inputs, timeout=300)
        results[layout] = {}
        for k in kinds:  # (tower of the first stage, logits of the last); TP ranks agree exactly
            towers = [r[k][0] for r in per_rank if r[k][0] is not None]
            last = [r[k][1:] for r in per_rank if r[k][1] is not None]
            assert len(towers) == tp and len(last) == tp
            assert all(torch.equal(t, towers[0]) for t in towers) and all(torch.equal(x[0], last[0][0]) for x in last)
            results[layout][k] = (towers[0],) + last[0]
        for k, plan in plans.items():
            ckpts[(k, layout)] = finish(plan)
    return SimpleNamespace(outputs=results, ckpts=ckpts)


CASES = [(k, layout) for layout, (_, _, kinds) in LAYOUTS.items() for k in kinds]


@pytest.mark.parametrize("model, layout", CASES)
def test_tower_parity(hf_models, converted, model, layout):
    ref = hf_models[model].tower
    got = converted.outputs[layout][model][0]
    diff = _max_diff(got, ref)
    MAX_DIFFS[(model, layout, "tower")] = diff
    assert ref.abs().max() > 0.5
    assert diff <= TOWER_TOL, f"{model} at {layout}: tower max abs diff {diff}"


@pytest.mark.parametrize("model, layout", CASES)
def test_logit_parity_with_images(hf_models, converted, model, layout):
    ref = hf_models[model].logits
    _, got, full_vocab = converted.outputs[layout][model]
    assert full_vocab  # the vocab-parallel logits were gathered
    diff = _max_diff(got, ref)
    MAX_DIFFS[(model, layout, "logits")] = diff
    assert diff <= LOGIT_TOL, f"{model} at {layout}: logits max abs diff {diff}"
    # the images matter: without them (placeholders as token 0) the logits differ a lot
    x = hf_models[model].inputs
    with torch.no_grad():
        ids = torch.where(x.ids == hf_models[model].config["image_token_id"], 0, x.ids)
        plain = hf_models[model].model(input_ids=ids).logits
    assert _max_diff(plain[:, OFFSET:], ref[:, OFFSET:]) > 100 * LOGIT_TOL


def test_checkpoint_contents(hf_models, converted):
    import yaml

    from megatron_kimi.config import ModelConfig, TrainConfig, build_config
    from megatron_kimi.training import checkpoint

    for (kind, layout), ckpt_dir in converted.ckpts.items():
        common = checkpoint.read_common(ckpt_dir)
        assert common["contents"] == ["model"]
        assert (common["layout"]["tp"], common["layout"]["pp"]) == LAYOUTS[layout][:2]
        assert common["hf"]["model_type"] == "kimi_k25" and common["hf"]["text_model_type"] == kind
        assert common["hf_architecture"] == "Kimi_K25ForConditionalGeneration"
        m = build_config(TrainConfig, {"model": common["config"]["model"], "training": {"seq_length": 1}}).model
        from_yaml = yaml.safe_load((ckpt_dir.parent / "model_config.yaml").read_text())["model"]
        assert build_config(TrainConfig, {"model": from_yaml, "training": {"seq_length": 1}}).model == m
        assert isinstance(m, ModelConfig) and m.vision is not None
        assert m.vision.image_token_id == hf_models[kind].config["image_token_id"]
        assert m.tie_word_embeddings == (kind == "llama") and m.add_qkv_bias == (kind == "qwen2")
        assert (m.vision.num_layers, m.vision.hidden_size, m.vision.ffn_hidden_size, m.vision.position_grid_size) \
            == (2, 32, 48, 8)
        assert m.vision.projector_norm_epsilon == hf_models[kind].config["projection_layer_norm_eps"]


# --------------------------------------------------------------------------------------------
# Back to HF
# --------------------------------------------------------------------------------------------


_TEXT_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "hidden_act", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias")
_TOP_FIELDS = ("model_type", "architectures", "image_token_id", "video_token_id", "tie_word_embeddings",
               "projection_hidden_size", "projection_layer_norm_eps", "vision_start_token_id", "vision_end_token_id")


def _check_roundtrip(orig, out: Path) -> None:
    from transformers.models.kimi_k25 import Kimi_K25ForConditionalGeneration

    from megatron_kimi.convert.hf import rope_theta_of

    back = _read_all(out)
    assert sorted(back) == sorted(orig.tensors)
    for k, t in orig.tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    cfg = json.loads((out / "config.json").read_text())
    for field in _TOP_FIELDS:
        assert cfg.get(field) == orig.config.get(field), field
    for field in _TEXT_FIELDS:
        assert cfg["text_config"].get(field) == orig.config["text_config"].get(field), f"text_config.{field}"
    assert rope_theta_of(cfg["text_config"]) == rope_theta_of(orig.config["text_config"])
    assert cfg["vision_config"] == orig.config["vision_config"]
    model = Kimi_K25ForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == cfg["tie_word_embeddings"]
    tower, logits = _hf_outputs(model.eval(), orig.inputs)
    assert torch.equal(tower, orig.tower) and _max_diff(logits, orig.logits) <= 1e-6


@pytest.mark.parametrize("model, layout", [("qwen2", "tp2"), ("qwen2", "pp2"), ("llama", "tp1")])
def test_roundtrip_api(hf_models, converted, model, layout, tmp_path):
    from megatron_kimi.convert.mcore_to_hf import mcore_to_hf

    out = mcore_to_hf(converted.ckpts[(model, layout)].parent, tmp_path / "hf")
    _check_roundtrip(hf_models[model], out)


def _cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_roundtrip_qwen2_tp2(hf_models, tmp_path):
    orig = hf_models["qwen2"]
    proc = _cli("hf-to-mcore", "--hf-dir", orig.dir, "--out", tmp_path / "mcore", "--tp", 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _cli("mcore-to-hf", "--ckpt", tmp_path / "mcore", "--out", tmp_path / "hf", "--max-shard-size", "60KB")
    assert proc.returncode == 0, proc.stderr[-4000:]
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _check_roundtrip(orig, tmp_path / "hf")


# --------------------------------------------------------------------------------------------
# Pure mapping functions and errors
# --------------------------------------------------------------------------------------------


def test_mapping_functions_are_inverse(hf_models):
    from megatron_kimi.convert import kimi_k25

    for kind in ("qwen2", "llama"):
        orig = hf_models[kind]
        m = kimi_k25.model_config_from_hf(orig.config)
        a = kimi_k25.arch_from_model_config(m, 256)
        assert {n: tuple(t.shape) for n, t in orig.tensors.items()} == {
            n: s for n, s in kimi_k25.hf_shapes(a).items() if not (a.tied and n == "lm_head.weight")}
        rebuilt = {}
        for name in kimi_k25.megatron_names(a):
            full = kimi_k25.megatron_from_hf(name, orig.tensors.__getitem__, a)
            rebuilt.update(kimi_k25.hf_from_megatron(name, full, a))
        assert sorted(rebuilt) == sorted(orig.tensors)
        assert all(torch.equal(rebuilt[n], orig.tensors[n]) for n in rebuilt)
        # ModelConfig -> config.json -> ModelConfig
        back = kimi_k25.hf_config_from_model_config(m, kind, m.vocab_size, torch.float32, base=orig.config)
        assert kimi_k25.model_config_from_hf(back) == m


def _write_config(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["text_config"].update(model_type="deepseek_v3"), r"text_config\.model_type='deepseek_v3'.*llama"),
    (lambda c: c.pop("text_config"), r"text_config=None"),
    (lambda c: c["vision_config"].update(pos_emb_width=6), r"pos_emb_height/width.*square"),
    (lambda c: c["vision_config"].update(merge_kernel_size=[2, 1]), r"merge_kernel_size"),
    (lambda c: c["vision_config"].update(hidden_act="gelu"), r"vision_config\.hidden_act="),
    (lambda c: c.update(projection_hidden_size=64), r"projection_hidden_size=64"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), r"text_config: .*hidden_act="),
])
def test_unsupported_config_names_the_field(hf_models, tmp_path, edit, field):
    from megatron_kimi.convert.hf_to_mcore import hf_to_mcore

    d = _write_config(hf_models["qwen2"].dir, tmp_path / "hf", edit)
    with pytest.raises(ValueError, match=field):
        hf_to_mcore(d, tmp_path / "out")


def test_original_layout_is_refused(hf_models, tmp_path):
    from megatron_kimi.convert.hf_to_mcore import hf_to_mcore

    hf_models["qwen2"].model.save_pretrained(str(tmp_path / "orig"))  # transformers' default: the original layout
    with pytest.raises(ValueError, match=r"original Kimi-K2\.5 layout.*save_original_format=False"):
        hf_to_mcore(tmp_path / "orig", tmp_path / "out")


def test_missing_vision_tensor_is_named(hf_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_kimi.convert.hf_to_mcore import hf_to_mcore

    d = tmp_path / "hf"
    shutil.copytree(hf_models["qwen2"].dir, d)
    tensors = load_file(str(d / "model.safetensors"))
    tensors.pop("model.vision_tower.layers.1.attn.k_proj.bias")
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'model\.vision_tower\.layers\.1\.attn\.k_proj\.bias'"):
        hf_to_mcore(d, tmp_path / "out")


def test_report_max_diffs():
    """Summary line (run last in this module)."""
    if MAX_DIFFS:
        print("\nmax abs diff vs HF: " + ", ".join(f"{m}/{lay}/{w}: {d:.2e}" for (m, lay, w), d in
                                                   sorted(MAX_DIFFS.items())))
