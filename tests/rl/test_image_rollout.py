"""RL with image prompts (rl/images.py): prompt encoding, the built-in engine's image prefill, RL packs.

On a spawned rank with a tiny random VLM (fp32): the engine's greedy continuations of image prompts
(mixed with a text-only prompt, in one prefill batch) have log-probs equal to the trainer's forward on
prompt + response with the same images; another image changes the engine's output; RL packs of those
samples (several per pack) give the trainer the same per-sample log-probs as one sample alone.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.timeout(300)


def _encoder(tokenizer):
    from megatron_kimi.data.images import ImageProcessing
    from megatron_kimi.rl.images import PromptImages

    return PromptImages(tokenizer, "<|image|>", ImageProcessing())


def test_prompt_encoding_expands_each_image_to_its_grid(tmp_path):
    from megatron_kimi.data.tokenizer import load_tokenizer
    from megatron_kimi.rl.images import image_count_prompts
    from megatron_kimi.rl.types import Prompt

    tok = load_tokenizer("builtin:char", tmp_path)
    enc = _encoder(tok)
    p = image_count_prompts(1, seed=4)[0]
    ids, images = enc.encode(p)
    assert enc.encode(p)[0] is ids  # memoised: a prompt is sampled k times
    run = [i for i, t in enumerate(ids) if t == enc.image_token_id]
    n = int(images.grid_thw.prod()) // 4
    assert len(run) == n and run == list(range(run[0], run[0] + n))
    assert images.token_index_BS[0, run].tolist() == list(range(n))
    assert (images.token_index_BS[0, [i for i in range(len(ids)) if i not in run]] == -1).all()
    # no marker in the text: the image goes first; a marker count that disagrees is an error
    bare = Prompt(prompt="How many?", answer="1", kind="exact", images=p.images)
    bare_ids = enc.encode(bare)[0]
    assert bare_ids[:run[-1] + 1] == ids[:run[-1] + 1]  # header, then the image's run
    assert bare_ids[run[-1] + 1:] == enc.encode(Prompt(prompt="How many?"))[0][run[0]:]  # then the text
    with pytest.raises(ValueError, match="2 image markers for 1 images"):
        enc.encode(Prompt(prompt="<image><image>?", images=p.images))
    with pytest.raises(ValueError, match="placeholder token"):
        enc.encode(Prompt(prompt="<|image|>?", images=p.images))


def _engine_body(rank, world_size, cache_dir, position_embedding_type):
    from megatron_kimi.platform import cpu_emulation

    cpu_emulation.activate()
    from megatron_kimi.data.tokenizer import load_tokenizer
    from megatron_kimi.rl.batching import pack_samples, reference_logprobs
    from megatron_kimi.rl.images import image_count_prompts
    from megatron_kimi.rl.types import Prompt, Sample
    from megatron_kimi.rollout.engine import GenerationEngine, GenerationRequest
    from megatron_kimi.rollout.sampling import SamplingParams
    from megatron_kimi.training.runtime import shutdown
    from tests.model.test_vision import _build

    tok = load_tokenizer("builtin:char", cache_dir)
    enc = _encoder(tok)
    assert len(tok) <= 128
    _, chunks = _build(1, model_extra={"position_embedding_type": position_embedding_type})
    model = chunks[0].eval()
    try:
        prompts = image_count_prompts(3, seed=1) + [Prompt(prompt="3+4=")]
        encoded = [enc.encode(p) if p.images else (enc.encode(p)[0], None) for p in prompts]
        engine = GenerationEngine(model, max_batch_size=8, max_seq_len=200, eos_token_id=tok.eos_token_id)
        params = SamplingParams(temperature=0.0, max_new_tokens=6, seed=0)
        reqs = [GenerationRequest(i, ids, params, images=im) for i, (ids, im) in enumerate(encoded)]
        results = engine.generate(reqs)
        out = {"diffs": [], "changed": None}
        with torch.no_grad():
            for (ids, im), res in zip(encoded, results):
                seq = torch.tensor([ids + res.output_ids])
                pos = torch.arange(seq.shape[1])[None]
                kwargs = {}
                if im is not None:
                    from megatron_kimi.model.vision.vlm import ImageInputs

                    index = torch.cat([im.token_index_BS, torch.full((1, len(res.output_ids)), -1)], 1)
                    kwargs["images"] = ImageInputs(im.pixel_values_N3PP, im.grid_thw, index)
                logp = torch.log_softmax(model(seq, pos, None, **kwargs)[0, :, :128].float(), -1)
                want = [logp[len(ids) - 1 + t, tok_id].item() for t, tok_id in enumerate(res.output_ids)]
                out["diffs"].append(max(abs(a - b) for a, b in zip(want, res.logprobs)))
        # the engine really looks at the image: another picture, another continuation
        other = image_count_prompts(1, seed=99)[0]
        ids0, im0 = encoded[0]
        _, im_other = enc.encode(other)
        if im_other.grid_thw.tolist() == im0.grid_thw.tolist():
            alt = engine.generate([GenerationRequest(0, ids0, params, images=type(im0)(
                im_other.pixel_values_N3PP, im0.grid_thw, im0.token_index_BS))])[0]
            out["changed"] = alt.logprobs != results[0].logprobs
        else:  # a different grid needs other placeholders: perturb this image's pixels instead
            alt = engine.generate([GenerationRequest(0, ids0, params, images=type(im0)(
                im0.pixel_values_N3PP + 0.5, im0.grid_thw, im0.token_index_BS))])[0]
            out["changed"] = alt.logprobs != results[0].logprobs
        # RL packs: all four samples in one pack == the engine's log-probs
        samples = [Sample(prompt_index=i, prompt=p, prompt_ids=e[0], response_ids=list(r.output_ids), response="",
                          sampler_logprobs=list(r.logprobs), finish_reason=r.finish_reason, images=e[1])
                   for i, (p, e, r) in enumerate(zip(prompts, encoded, results))]
        packs = pack_samples(samples, list(range(4)), 400, tok.pad_token_id, 0, 1, torch.zeros(4))
        assert len(packs) == 1 and "images" in packs[0]
        ref, _ = reference_logprobs([model], packs, samples, 400)
        out["pack_vs_engine"] = max(abs(ref[i].item() - sum(r.logprobs)) for i, r in enumerate(results))
        return out
    finally:
        shutdown()


@pytest.mark.parametrize("position_embedding_type", ["rope", "learned_absolute"])
def test_engine_prefills_images_like_the_trainer(tmp_path, position_embedding_type):
    out = run_distributed(_engine_body, 1, str(tmp_path), position_embedding_type)[0]
    assert max(out["diffs"]) < 1e-4, out["diffs"]
    assert out["changed"] is True
    assert out["pack_vs_engine"] < 1e-4


def test_records_written_elsewhere_keep_their_images(tmp_path):
    """sample/difficulty outputs of image prompts: image parts with paths that work from anywhere."""
    from megatron_kimi.data.image_sft import builtin_image_jsonl
    from megatron_kimi.data.image_synth import parse_image_messages
    from megatron_kimi.rl.data import load_prompts
    from megatron_kimi.rl.images import image_count_prompts, user_content

    data = builtin_image_jsonl(tmp_path / "imgs" / "data.jsonl", 2, seed=5)
    import json

    first = json.loads(data.read_text().splitlines()[0])
    rel = first["messages"][0]["content"][0]["image"]  # relative to the jsonl
    prompts_file = tmp_path / "imgs" / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "<image>How many?", "answer": "2", "images": [rel]}) + "\n"
                            + json.dumps({"prompt": "Count: <image>", "answer": "3",
                                          "images": [image_count_prompts(1, 0)[0].images[0]]}) + "\n")
    p_path, p_b64 = load_prompts(prompts_file)
    parts = user_content(p_path)
    assert parts[0]["type"] == "image" and parts[0]["image"] == str((tmp_path / "imgs" / rel).resolve())
    assert parts[1] == {"type": "text", "text": "How many?"}
    parts = user_content(p_b64)
    assert parts[0] == {"type": "text", "text": "Count: "} and parts[1]["image"].startswith("data:image/png")
    # read back from another folder, as image SFT does
    messages = [{"role": "user", "content": user_content(p_path)}, {"role": "assistant", "content": "2"}]
    text, images = parse_image_messages(messages, base_dir=tmp_path / "elsewhere")
    assert len(images) == 1 and text[0]["content"] == "<image>How many?"
