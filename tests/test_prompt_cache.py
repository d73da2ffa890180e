"""Zero-shot prompts through a frozen text tower are encoded once and kept on disk; the embeddings are unchanged."""
import torch

from emclip.model import build_model
from emclip.train.text_cache import cached_text_encoder


def test_prompt_features_are_cached_and_equal_the_tower(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", lock_text=True).eval()
    prompts = ["an electron micrograph of minimal change disease", "EM image showing amyloidosis", "normal"]
    calls = []
    real = model.encode_text_pooled
    model.encode_text_pooled = lambda texts: calls.append(len(texts)) or real(texts)
    encode = cached_text_encoder(model, tmp_path, log=lambda *_: None)
    with torch.no_grad():
        want = model.encode_text(prompts)
        first = encode(prompts)
        built = sum(calls)
        again = cached_text_encoder(model, tmp_path, log=lambda *_: None)(prompts)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-6)
    assert built >= len(prompts) and sum(calls) - built <= 1    # the second encoder reads the file (one probe text)
    assert len(list(tmp_path.glob("prompts-*.npz"))) == 1
    with torch.no_grad():                                       # another tower state: another key, another file
        next(p for n, p in model.text.named_parameters() if not model.text.is_projection(n)).add_(0.1)
        changed = encode(prompts)
    assert len(list(tmp_path.glob("prompts-*.npz"))) == 2 and not torch.allclose(changed, want)


def test_a_damaged_prompt_cache_is_rebuilt(tmp_path):
    model = build_model("tiny", lock_text=True).eval()
    logs = []
    with torch.no_grad():
        want = cached_text_encoder(model, tmp_path, log=logs.append)(["a prompt"])
        path = next(tmp_path.glob("prompts-*.npz"))
        path.write_bytes(b"not an npz")
        got = cached_text_encoder(model, tmp_path, log=logs.append)(["a prompt"])
    torch.testing.assert_close(got, want)
    assert any("damaged" in line for line in logs)
