"""Reference photos for proving that ImageNet weights really loaded, taken from installed dependencies.

Nothing is copied into this repository and nothing is downloaded: the photos ship inside the scikit-learn and
matplotlib wheels, both dependencies of emclip.

* ``china``: scikit-learn's ``datasets/images/china.jpg``, a Chinese palace-style building; CC BY 2.0,
  "Some rights reserved by danielbuechele" (Flickr), see ``sklearn/datasets/images/README.txt``.
  ImageNet-1k class 698 "palace".
* ``grace_hopper``: matplotlib's ``mpl-data/sample_data/grace_hopper.jpg``, the U.S. Navy portrait of Rear Admiral
  Grace Hopper (a work of the U.S. federal government, public domain). ImageNet-1k class 652 "military uniform".
"""
from pathlib import Path

# name -> (expected ImageNet-1k class index, its description)
IMAGENET_PHOTOS = {
    'china': (698, 'palace'),
    'grace_hopper': (652, 'military uniform'),
}


def photo_path(name: str = 'china') -> Path:
    """Path of a reference photo inside its installed package."""
    if name == 'china':
        import sklearn
        path = Path(sklearn.__file__).parent / 'datasets' / 'images' / 'china.jpg'
    elif name == 'grace_hopper':
        import matplotlib
        path = Path(matplotlib.get_data_path()) / 'sample_data' / 'grace_hopper.jpg'
    else:
        raise ValueError(f'Unknown photo {name!r}; choose one of {sorted(IMAGENET_PHOTOS)}')
    if not path.is_file():
        raise FileNotFoundError(f'Reference photo {name!r} not found at {path}; is the package installed fully?')
    return path
