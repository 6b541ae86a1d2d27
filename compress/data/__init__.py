"""Datasets and loaders: bundled digits, CIFAR-10/100, npz folders and ImageFolder trees.

Every dataset yields ``(uint8 CxHxW tensor, int label)`` at the recipe's ``image_size``; loaders
yield uint8 NCHW batches. Augmentation and normalisation happen later, on a whole batch on its
device, in :class:`Preprocess`: decoding stays cheap and the same on every backend, and the
exported model receives exactly the normalised tensors it was trained on.

``data.unlabeled`` appends extra images to the train split with label ``UNLABELED`` (-1): only
the teacher-driven loss terms learn from them (:func:`load_unlabeled`).

Image files (``imagefolder`` and unlabeled folders) are checked before anything trains: files
whose names are hidden (``.DS_Store``, macOS ``._photo.jpg``) or lack an image extension are not
part of the dataset, hidden folders (``.ipynb_checkpoints/``) are not classes, and every image file
a split uses must open as an image (its header is read, nothing is decoded); otherwise one
:class:`DataError` names the first bad file and how many there are. A file that is damaged
further in (a truncated JPEG) can only be found by decoding it: it raises a one-line
:class:`DataError` naming it when it is first read, in a worker process too. Bad files are
never skipped silently: remove or fix them.

One reader per source (:mod:`.digits`, :mod:`.cifar`, :mod:`.npz`, :mod:`.imagefolder`), found
through :data:`compress.data.spec.DATASET_KINDS` by :func:`.load.load_dataset`; :mod:`.loaders`
batches them, :mod:`.augment` augments and normalises whole batches.

Example:
    >>> bundle = load_dataset(DataConfig(kind="digits"))
    >>> train_loader, test_loader = make_loaders(bundle, DataConfig(kind="digits"), seed=0)
    >>> prep = Preprocess(bundle.mean, bundle.std, augment=True)
    >>> images, labels = next(iter(train_loader))
    >>> x = prep(images, train=True)  # float, normalised, augmented
"""

from compress.data.spec import DATASET_KINDS

__all__ = ["DATASET_KINDS"]
