"""Tests of the whole project (pytest, CPU, tiny models; no downloads). Run: `python -m pytest -q test_all.py`.

Independent truths used: open_clip (`open_clip_torch`, an independent CLIP implementation), hand computations,
CoOp's published few-shot selections, finite differences.
"""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import clip_model

ROOT = Path(__file__).resolve().parent
SENTENCES = ["a photo of a dog.", "an origami crane flying over the sea at dawn", "itap of a tench.",
             "A CENTERED satellite photo of Sea or Lake.", "a photo of a person doing Yo Yo."]
TOL = 1e-5  # issue #2: float32 agreement with the independent implementation


# ----------------------------------------------------------------------------------------------------------------
# clip_model.py: parity with open_clip


def open_clip_tiny():
    """An open_clip CLIP with the same shapes as `clip_model.tiny_config()`, random weights, no download."""
    import open_clip
    cfg = clip_model.tiny_config()
    vision = open_clip.CLIPVisionCfg(layers=cfg["vision_layers"], width=cfg["vision_width"],
                                     patch_size=cfg["vision_patch_size"], image_size=cfg["image_resolution"],
                                     head_width=clip_model.HEAD_WIDTH)
    text = open_clip.CLIPTextCfg(context_length=cfg["context_length"], vocab_size=cfg["vocab_size"],
                                 width=cfg["transformer_width"], heads=cfg["transformer_heads"],
                                 layers=cfg["transformer_layers"])
    return open_clip.CLIP(cfg["embed_dim"], vision, text, quick_gelu=True).eval()


def open_clip_b16():
    import open_clip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()


def assert_same_outputs(reference, ours, resolution):
    """Image features, text features and logits of open_clip and of our CLIP with the same weights."""
    torch.manual_seed(0)
    images = torch.randn(3, 3, resolution, resolution)  # (B, 3, R, R)
    text = clip_model.tokenize(SENTENCES)  # (N, L)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), reference.encode_image(images), rtol=TOL, atol=TOL)
        torch.testing.assert_close(ours.encode_text(text), reference.encode_text(text), rtol=TOL, atol=TOL)
        ref_img, ref_txt, ref_scale = reference(images, text)[:3]
        logits, _ = ours(images, text)
        torch.testing.assert_close(logits, ref_scale * ref_img @ ref_txt.t(), rtol=TOL, atol=TOL * 100)


@pytest.mark.parametrize("make,resolution", [(open_clip_b16, 224), (open_clip_tiny, 32)], ids=["ViT-B-16", "tiny"])
def test_parity_with_open_clip(make, resolution):
    reference = make()
    ours = clip_model.build_model(reference.state_dict())  # strict: every key must match
    assert clip_model.infer_config(reference.state_dict())["image_resolution"] == resolution
    assert_same_outputs(reference, ours, resolution)


def test_build_model_infers_b16_shapes():
    cfg = clip_model.infer_config(open_clip_b16().state_dict())
    assert cfg == {"embed_dim": 512, "image_resolution": 224, "vision_layers": 12, "vision_width": 768,
                   "vision_patch_size": 16, "context_length": 77, "vocab_size": 49408, "transformer_width": 512,
                   "transformer_heads": 8, "transformer_layers": 12}  # protocol.md Sec. 7.2 table


# ----------------------------------------------------------------------------------------------------------------
# clip_model.py: tokenizer

TOKENIZER_STRINGS = [
    "a photo of a cat.", "A Photo Of A CAT", "", " ", "   leading and trailing   ", "tabs\tand\nnewlines\r\n",
    "it's they're we've I'm you'll he'd can't", "don't stop", "hello, world!", "what?!?!", "...", "---===+++",
    "(parentheses) [brackets] {braces}", "e-mail: someone@example.com", "https://example.com/path?q=1&x=2",
    "3.14159", "1,000,000", "2024-11-23", "007 agent", "a1b2c3", "½ cup of sugar", "x² + y² = z²",
    "café crème brûlée", "naïve façade", "Zürich Straße", "ÅNGSTRÖM", "日本語のテキスト", "中文文本测试",
    "한국어 텍스트", "русский текст", "ελληνικά", "עברית", "العربية", "हिन्दी", "emoji 😀🎉👍🏽",
    "flags 🇫🇷🇩🇪", "&amp; &lt;tag&gt; &quot;quoted&quot;", "&amp;amp; double escaped", "&#39;apostrophe&#39;",
    "mojibake: Ã©tÃ© â€œquotesâ€\x9d", "smart “quotes” and ‘single’", "em—dash and en–dash", "ellipsis…",
    "non\u00a0breaking\u00a0space", "zero\u200bwidth", "<html> tags </html>", "pipes | and || bars",
    "Abyssinian_100", "american_bulldog", "F/A-18", "707-320", "Cessna 172", "a photo of a Yo Yo.",
    "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "#hashtag @mention $100 %50 ^caret *star",
    "a centered satellite photo of Annual Crop Land.",
]
LONG_TEXT = " ".join(f"word{i} with, punctuation!" for i in range(60))


def test_tokenizer_equals_open_clip():
    from open_clip.tokenizer import tokenize as reference
    assert len(TOKENIZER_STRINGS) >= 50
    torch.testing.assert_close(clip_model.tokenize(TOKENIZER_STRINGS), reference(TOKENIZER_STRINGS).long())
    # long text: open_clip always truncates (last token = EOT); ours does so only when asked, and refuses otherwise
    torch.testing.assert_close(clip_model.tokenize([LONG_TEXT], truncate=True), reference([LONG_TEXT]).long())
    with pytest.raises(ValueError, match="longer than the context length"):
        clip_model.tokenize([LONG_TEXT])
    torch.testing.assert_close(clip_model.tokenize(TOKENIZER_STRINGS[:8], context_length=16, truncate=True),
                               reference(TOKENIZER_STRINGS[:8], context_length=16).long())


def test_tokenizer_round_trip_and_hand_values():
    tok = clip_model._tokenizer()
    assert (tok.sot_token, tok.eot_token, len(tok.encoder)) == (49406, 49407, 49408)  # protocol.md Sec. 7.3
    # openai/CLIP (not open_clip, which renamed them) maps the literal special strings to their ids
    assert tok.encode("a <|endoftext|> b") == [320, 49407, 321]
    assert tok.decode(tok.encode("a photo of a cat.")).strip() == "a photo of a cat ."
    ids = clip_model.tokenize("a photo of a cat.")[0]
    assert ids[:8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407] and ids[8:].eq(0).all()


# ----------------------------------------------------------------------------------------------------------------
# clip_model.py: checkpoints


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return clip_model.CLIP(**clip_model.tiny_config()).eval()


def trace_official_format(model, path):
    copy = clip_model.build_model(model.state_dict())
    for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        copy.__dict__.pop(key, None)
        copy.register_buffer(key, torch.tensor(value))
    example = (torch.randn(1, 3, 32, 32), clip_model.tokenize(["a photo of a dog."]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(copy, example).save(str(path))


def assert_same_model(a, b):
    images, text = torch.randn(2, 3, 32, 32), clip_model.tokenize(SENTENCES)
    with torch.no_grad():
        assert torch.equal(a(images, text)[0], b(images, text)[0])


def test_load_torchscript_archive_and_state_dict(tiny, tmp_path):
    trace_official_format(tiny, tmp_path / "tiny.pt")
    torch.save(tiny.state_dict(), tmp_path / "tiny_state.pt")
    half = {k: v.half() if v.is_floating_point() else v for k, v in tiny.state_dict().items()}
    torch.save(half, tmp_path / "tiny_half.pt")  # released checkpoints hold fp16 weights
    for name in ("tiny.pt", "tiny_state.pt"):
        loaded = clip_model.load(tmp_path / name, device="cpu")
        assert loaded.dtype == torch.float32 and not loaded.training
        assert_same_model(loaded, tiny)
    loaded = clip_model.load(tmp_path / "tiny_half.pt", device="cpu")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, half[key].float()), key


def test_bad_checkpoints_give_clear_errors(tiny, tmp_path):
    trace_official_format(tiny, tmp_path / "tiny.pt")
    data = (tmp_path / "tiny.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(clip_model.CheckpointError, match="truncated.pt"):
        clip_model.load(tmp_path / "truncated.pt", device="cpu")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(clip_model.CheckpointError, match=r"other.pt.*not a CLIP ViT state dict: missing visual.proj"):
        clip_model.load(tmp_path / "other.pt", device="cpu")
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1)}, tmp_path / "rn50.pt")
    with pytest.raises(clip_model.CheckpointError, match="ResNet CLIP checkpoints .* not supported; supported: ViT"):
        clip_model.load(tmp_path / "rn50.pt", device="cpu")
    with pytest.raises(clip_model.CheckpointError, match="ViT-B/16"):
        clip_model.load("ViT-H/99", device="cpu")
    with pytest.raises(clip_model.CheckpointError, match="not supported"):
        clip_model.load("RN50", device="cpu")


def fake_release(tiny, tmp_path, monkeypatch, corrupt=False):
    """Serve a tiny checkpoint from a file:// URL laid out like OpenAI's (<sha256>/<name>.pt)."""
    trace_official_format(tiny, tmp_path / "served.pt")
    sha = clip_model.sha256_of(tmp_path / "served.pt")
    if corrupt:
        sha = "0" * 64
    url = f"file://{tmp_path}/{sha}/ViT-T-8.pt"
    (tmp_path / sha).mkdir()
    (tmp_path / "served.pt").rename(tmp_path / sha / "ViT-T-8.pt")
    monkeypatch.setitem(clip_model.MODELS, "ViT-T/8", url)
    return tmp_path / "cache"


def test_download_verifies_checksum(tiny, tmp_path, monkeypatch):
    cache = fake_release(tiny, tmp_path, monkeypatch)
    assert_same_model(clip_model.load("ViT-T/8", device="cpu", download_root=cache), tiny)
    (cache / "ViT-T-8.pt").write_bytes(b"tampered")  # a cached file with the wrong checksum is re-fetched
    with pytest.warns(UserWarning, match="SHA256 does not match"):
        assert_same_model(clip_model.load("ViT-T/8", device="cpu", download_root=cache), tiny)


def test_download_refuses_checksum_mismatch(tiny, tmp_path, monkeypatch):
    cache = fake_release(tiny, tmp_path, monkeypatch, corrupt=True)
    with pytest.raises(clip_model.CheckpointError, match="does not match its SHA256"):
        clip_model.load("ViT-T/8", device="cpu", download_root=cache)
    assert not list(cache.iterdir())  # nothing unverified is left behind


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setitem(clip_model.MODELS, "ViT-T/8", f"file://{tmp_path}/{'0' * 64}/ViT-T-8.pt")
    with pytest.raises(clip_model.CheckpointError, match=f"put it at {tmp_path / 'cache' / 'ViT-T-8.pt'}"):
        clip_model.load("ViT-T/8", device="cpu", download_root=tmp_path / "cache")


def test_cli_reports_user_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "clip_model.py"), str(tmp_path / "missing.pt")],
                            check=False, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "missing.pt" in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# clip_model.py: prompt entry points


def test_entry_points_without_prompts_reproduce_encoders(tiny):
    text, images = clip_model.tokenize(SENTENCES), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = tiny.encode_text_embeddings(tiny.token_embedding(text), text.argmax(-1), truncate=False)
        short = tiny.encode_text_embeddings(tiny.token_embedding(text), text.argmax(-1), truncate=True)
        assert torch.equal(tiny.encode_text(text, truncate=False), full)
        assert torch.equal(tiny.encode_text(text), short)
        torch.testing.assert_close(short, full, rtol=TOL, atol=TOL)  # causal mask: truncation is exact
        assert torch.equal(tiny.encode_image(images, prompts=None, deep_prompts=()), tiny.visual(images))


def hand_text_with_deep_prompts(model, x, eot_idx, deep):
    """The IVLP text convention computed step by step: deep prompt i replaces tokens 1..M before block i."""
    x = x + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, :1], deep[i - 1].expand(x.shape[0], -1, -1), x[:, 1 + deep[i - 1].shape[0]:]], 1)
        x = block(x, causal=True)
    return model.ln_final(x)[torch.arange(x.shape[0]), eot_idx] @ model.text_projection


def hand_image_with_prompts(model, images, shallow, deep):
    """The IVLP/ProMetaR vision convention: prompts appended after the positional embedding; block i>=1 swaps the
    last M tokens for its own prompts."""
    v = model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    x = v.ln_pre(torch.cat([x, shallow.expand(x.shape[0], -1, -1)], 1))
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, :-deep[i - 1].shape[0]], deep[i - 1].expand(x.shape[0], -1, -1)], 1)
        x = block(x, causal=False)
    return v.ln_post(x[:, 0]) @ v.proj


def test_deep_prompts_follow_the_ivlp_convention(tiny):
    torch.manual_seed(1)
    text = clip_model.tokenize(SENTENCES)
    x, eot_idx = tiny.token_embedding(text), text.argmax(-1)
    deep_text = [torch.randn(3, 64, requires_grad=True)]  # block 1 of 2
    ours = tiny.encode_text_embeddings(x, eot_idx, deep_prompts=deep_text)
    torch.testing.assert_close(ours, hand_text_with_deep_prompts(tiny, x, eot_idx, deep_text), rtol=TOL, atol=TOL)
    images = torch.randn(2, 3, 32, 32)
    shallow, deep_image = torch.randn(4, 64, requires_grad=True), [torch.randn(4, 64, requires_grad=True)]
    ours = tiny.encode_image(images, prompts=shallow, deep_prompts=deep_image)
    torch.testing.assert_close(ours, hand_image_with_prompts(tiny, images, shallow, deep_image), rtol=TOL, atol=TOL)


def test_gradients_reach_prompts_and_never_frozen_weights(tiny):
    model = clip_model.build_model(tiny.state_dict()).requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = clip_model.tokenize(SENTENCES)
    ctx = model.token_embedding(text)[:, 1:3].mean(0).clone().requires_grad_(True)  # (M, D) shared context
    x = torch.cat([model.token_embedding(text)[:, :1], ctx.expand(len(SENTENCES), -1, -1),
                   model.token_embedding(text)[:, 3:]], 1)
    deep_text, shallow = [torch.randn(2, 64, requires_grad=True)], torch.randn(3, 64, requires_grad=True)
    deep_image = [torch.randn(3, 64, requires_grad=True)]
    loss = model.encode_text_embeddings(x, text.argmax(-1), deep_prompts=deep_text).square().sum() \
        + model.encode_image(torch.randn(2, 3, 32, 32), shallow, deep_image).square().sum()
    loss.backward()
    for prompt in (ctx, deep_text[0], shallow, deep_image[0]):
        assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_truncation_never_cuts_the_end_of_text(tiny):
    text = clip_model.tokenize(["a", "a much longer sentence with many more tokens than the first one"])
    x, eot_idx = tiny.token_embedding(text), text.argmax(-1)
    with torch.no_grad():
        torch.testing.assert_close(tiny.encode_text_embeddings(x, eot_idx, truncate=True),
                                   tiny.encode_text_embeddings(x, eot_idx, truncate=False), rtol=TOL, atol=TOL)
    with pytest.raises(ValueError, match="eot_idx must be"):
        tiny.encode_text_embeddings(x, torch.tensor([2, 77]))
    with pytest.raises(ValueError, match="overwrite an end-of-text token"):
        tiny.encode_text_embeddings(x, eot_idx, deep_prompts=[torch.zeros(2, 64)])


def test_double_backward_through_attention_with_math_backend(tiny):
    """Second-order gradients (ProMetaR's meta step) need the math SDPA kernel; check them on a tiny model."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = clip_model.build_model(tiny.state_dict()).double().requires_grad_(False)
    prompt = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)

    def loss(p):
        return model.encode_image(images, prompts=p).square().sum()

    with sdpa_kernel(SDPBackend.MATH):
        assert torch.autograd.gradgradcheck(loss, (prompt,), eps=1e-6, atol=1e-4)
