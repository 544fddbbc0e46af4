"""TFDS source: a tiny array_record dataset read through `tfds.data_source`, without TensorFlow."""

import io

import numpy as np
import pytest
from PIL import Image

from paligemma_ft.data import sources
from paligemma_ft.data.transforms import BadExample

tfds = pytest.importorskip("tensorflow_datasets")


def png(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(out, "PNG")
    return out.getvalue()


class PgftTestCaptions(tfds.core.GeneratorBasedBuilder):
    """Three records with an encoded image, one caption and a nested list of captions."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "caption": tfds.features.Text(),
                    "meta": {"captions": tfds.features.Sequence(tfds.features.Text())},
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(3):
            yield (
                i,
                {
                    "image": png((i * 50, 0, 0)),
                    "caption": f"caption {i}",
                    "meta": {"captions": [f"first {i}", f"second {i}"]},
                },
            )


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    PgftTestCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_data_source_with_field_mapping(tfds_dir):
    src = sources.make_source(
        {"source": "tfds", "name": "pgft_test_captions", "split": "train", "data_dir": str(tfds_dir)}
    )
    assert len(src) == 3
    ex = src[2]
    assert ex["suffix"] == "caption 2" and ex["references"] == ["caption 2"] and ex["prefix"] is None
    assert ex["image"].dtype == np.uint8 and ex["image"][0, 0].tolist() == [100, 0, 0]
    nested = sources.TfdsSource(
        "pgft_test_captions", "train[1:]", str(tfds_dir), fields={"suffix": "meta/captions", "prefix": "caption"}
    )
    assert len(nested) == 2
    assert nested[0]["references"] == ["first 1", "second 1"] and nested[0]["prefix"] == "caption 1"
    missing = sources.TfdsSource("pgft_test_captions", "train", str(tfds_dir), fields={"suffix": "label"})
    with pytest.raises(BadExample, match="no feature 'label'"):
        missing[0]
    with pytest.raises(ValueError, match="input.data.fields.image must name the image feature"):
        sources.TfdsSource("pgft_test_captions", "train", str(tfds_dir), fields={"image": None})


def test_tfds_clear_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared.*array_record"):
        sources.TfdsSource("pgft_test_captions", "train", str(tmp_path))
    with pytest.raises(ValueError, match="TFDS has no dataset 'no_such_dataset_xyz'"):
        sources.TfdsSource("no_such_dataset_xyz", "train", str(tmp_path))
