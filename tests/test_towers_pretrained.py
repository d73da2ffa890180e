"""The offline pretrained default builds with the network cut and its weights really loaded.

Image side: the trunk inside emclip gives the ImageNet classifier's pre-logit features, and with the classifier
head it names the right ImageNet class for photos shipped inside installed packages. Text side: the tower gives
all-MiniLM-L6-v2's mean-pooled embedding, computed independently with transformers (and sentence-transformers).
"""
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from emclip.assets import IMAGENET_PHOTOS, photo_path
from emclip.model import build_model, create_timm_classifier, resolve_weights

pytestmark = pytest.mark.slow

SENTENCES = [
    'The glomerular basement membrane is diffusely thickened.',
    'Diffuse thickening of the glomerular basement membrane is seen.',
    'The cat sat on a sunny windowsill.',
]


@pytest.fixture(scope='module')
def no_network():
    """Any attempt to open a network connection fails the test; local sockets (AF_UNIX) are allowed."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f'network access attempted: {address}')
        return real_connect(self, address)

    socket.socket.connect = guarded
    yield
    socket.socket.connect = real_connect


@pytest.fixture(scope='module')
def build_offline(no_network):
    """Build each offline config once per module, with the Hub switched off and the network cut."""
    built = {}
    mp = pytest.MonkeyPatch()
    mp.setenv('HF_HUB_OFFLINE', '1')
    mp.setenv('TRANSFORMERS_OFFLINE', '1')

    def build(name):
        if name not in built:
            torch.manual_seed(0)
            built[name] = build_model(name).eval()
        return built[name]

    yield build
    mp.undo()


@pytest.fixture(params=['efficientnet_lite0_minilm', 'efficientnet_lite2_minilm'])
def offline_model(request, build_offline):
    return build_offline(request.param)


@pytest.fixture
def default_model(build_offline):
    return build_offline('efficientnet_lite0_minilm')


def _load_photo(name, preprocess):
    """Resize the short side to size / 0.875 (bicubic), centre crop, normalise: timm's eval transform."""
    size = preprocess['image_size']
    img = Image.open(photo_path(name)).convert('RGB')
    short = round(size / 0.875)
    w, h = img.size
    img = img.resize((round(w * short / min(w, h)), round(h * short / min(w, h))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255
    mean, std = torch.tensor(preprocess['mean'])[:, None, None], torch.tensor(preprocess['std'])[:, None, None]
    return ((x - mean) / std)[None]


def test_trunk_is_the_imagenet_network(offline_model):
    assert offline_model.preprocess['mean'] == (0.5, 0.5, 0.5) and offline_model.preprocess['std'] == (0.5, 0.5, 0.5)
    ref = offline_model.config['image_weights']
    classifier = create_timm_classifier(ref)
    x = _load_photo('china', offline_model.preprocess)
    with torch.no_grad():
        ours = offline_model.encode_trunk(x)
        theirs = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert '|offline:efficientnet_lite' in offline_model.trunk_id


@pytest.mark.parametrize('photo', sorted(IMAGENET_PHOTOS))
def test_trunk_classifies_photo(offline_model, photo):
    index, label = IMAGENET_PHOTOS[photo]
    head = create_timm_classifier(offline_model.config['image_weights']).get_classifier()
    with torch.no_grad():
        probs = head(offline_model.encode_trunk(_load_photo(photo, offline_model.preprocess))).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    if photo == 'china':
        assert top5[0] == index, (label, top5)
    else:  # ImageNet labels for a portrait are ambiguous (academic gown, suit...): ask for the top 5
        assert index in top5, (label, top5)
    # control: the same architecture with random weights does not
    import timm
    torch.manual_seed(0)
    random_net = timm.create_model(offline_model.config['vision_cfg']['timm_model_name'], pretrained=False).eval()
    with torch.no_grad():
        assert random_net(_load_photo(photo, offline_model.preprocess)).argmax().item() != index


def _independent_minilm(sentences):
    """all-MiniLM-L6-v2 sentence embedding straight from transformers: mean over non-padding tokens."""
    from transformers import AutoModel, AutoTokenizer
    folder = resolve_weights('offline:all-MiniLM-L6-v2')
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    enc = tokenizer(sentences, padding=True, truncation=True, return_tensors='pt')
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc['attention_mask'][..., None].float()
    return (hidden * m).sum(1) / m.sum(1)


def _tower_pooled(model, sentences):
    """Our text tower's pooled output, before the (new, random) projection into the joint space."""
    with torch.no_grad():
        return model.encode_text_pooled(sentences)


def test_text_tower_reproduces_minilm(default_model):
    model = default_model
    ours = _tower_pooled(model, SENTENCES)
    torch.testing.assert_close(ours, _independent_minilm(SENTENCES), rtol=0, atol=1e-5)
    sim = F.normalize(ours, dim=-1) @ F.normalize(ours, dim=-1).T
    assert sim[0, 1] > 0.8 and sim[0, 1] > sim[0, 2] + 0.5, sim
    emb = model.encode_text(SENTENCES)
    assert emb.shape == (3, model.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # tokenize() cuts trailing padding for speed; open_clip's HF tower on the full context length agrees
    full = model.tokenizer(SENTENCES)
    assert model.tokenize(SENTENCES).shape[1] < full.shape[1] == 256
    with torch.no_grad():
        reference = F.normalize(model.text.clip.text(full), dim=-1)
    torch.testing.assert_close(reference, emb, rtol=0, atol=1e-5)


def test_text_tower_matches_sentence_transformers(default_model):
    st = pytest.importorskip('sentence_transformers')
    reference = st.SentenceTransformer(resolve_weights('offline:all-MiniLM-L6-v2'), device='cpu')
    known = torch.as_tensor(reference.encode(SENTENCES, convert_to_numpy=True))
    torch.testing.assert_close(F.normalize(_tower_pooled(default_model, SENTENCES), dim=-1), known, rtol=0, atol=1e-5)


def test_random_text_tower_differs():
    """Control for the two checks above: without the weights the same comparison fails."""
    torch.manual_seed(0)
    model = build_model('efficientnet_lite0_minilm', load_pretrained=False)
    assert (_tower_pooled(model, SENTENCES) - _independent_minilm(SENTENCES)).abs().max() > 0.1
    assert model.trunk_id.split('|')[1] == 'random'
