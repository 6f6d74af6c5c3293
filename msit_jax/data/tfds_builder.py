"""Prepare a TFDS dataset of HR images from image folders, without TensorFlow.

    python -m msit_jax.data.tfds_builder --data_dir ~/tensorflow_datasets \
        --split train=/data/DIV2K/DIV2K_train_HR --split validation=/data/DIV2K/DIV2K_valid_HR

writes `msit_images/1.0.0` (ArrayRecord) under data_dir; train from it with
`--config.data.train.kind=tfds --config.data.train.name=msit_images
--config.data.train.data_dir=~/tensorflow_datasets`.

Features: 'hr' (H, W, 3) uint8 stored as a zlib-compressed tensor (TFDS's
Image feature needs TensorFlow to *encode*, though not to decode), and
'name', the source file name. Reading uses `tfds.data_source`.
"""

from __future__ import annotations

import argparse
import os
from typing import Mapping, Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from msit_jax.images import list_images, read_image


class MsitImages(tfds.core.GeneratorBasedBuilder):
    """HR training images (one example per file)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "HR images from folders, zlib-compressed uint8 tensors."}
    # TFDS derives this through importlib_resources (not installed) for builders
    # defined in packages; it only locates the (absent) checksums file.
    code_path = epath.Path(__file__)

    def __init__(self, *, folders: Optional[Mapping[str, str]] = None, **kwargs):
        # folders: split name -> image folder; only needed to prepare.
        self._folders = dict(folders or {})
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "hr": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                           encoding="zlib"),
                "name": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if not self._folders:
            raise ValueError("MsitImages needs folders={split: image folder} to prepare")
        return {split: self._generate_examples(folder) for split, folder in self._folders.items()}

    def _generate_examples(self, folder: str):
        files = list_images(folder)
        if not files:
            raise FileNotFoundError(f"{folder}: no image files")
        for path in files:
            name = os.path.basename(path)
            yield name, {"hr": read_image(path), "name": name}


def prepare(folders: Mapping[str, str], data_dir: str) -> str:
    """Prepare `msit_images` from {split: folder} under data_dir; returns the dataset dir."""
    builder = MsitImages(folders=folders, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.data_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", required=True, help="TFDS data dir to write into")
    ap.add_argument("--split", action="append", required=True, metavar="NAME=FOLDER",
                    help="a split and its image folder (repeatable)")
    args = ap.parse_args(argv)
    folders = {}
    for s in args.split:
        name, sep, folder = s.partition("=")
        if not sep or not name or not folder:
            ap.error(f"--split expects NAME=FOLDER, got {s!r}")
        folders[name] = folder
    print(prepare(folders, os.path.expanduser(args.data_dir)))


if __name__ == "__main__":
    main()
