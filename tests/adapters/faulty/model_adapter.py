"""A deliberately faulty Dataloop adapter, for detserve's tests: one fault per failure detserve must answer clearly.

The top-left pixel of an image picks the fault, so one served model shows each:

- an image smaller than 16 px: ``prepare_item_func`` raises (that image's 4xx);
- red (255, 0, 0): ``predict`` raises (500 inference_failed for its batch);
- green (0, 255, 0): ``predict`` returns one collection fewer than the batch (500 invalid_prediction);
- blue (0, 0, 255): ``predict`` returns dicts, not annotations (500 invalid_prediction);
- anything else: one box over the image's top-left quarter, scored by the image's mean brightness.

The configuration adds the rest: ``fail_load`` makes ``load`` raise, ``predict_seconds`` makes
``predict`` take that long per image. ``predict`` raises if two threads call it at once: it is not
thread-safe, as detserve assumes of adapters.
"""

import os
import threading
import time

import dtlpy as dl
import numpy as np
from PIL import Image


class Adapter(dl.BaseModelAdapter):
    def load(self, local_path, **kwargs):
        if self.configuration.get("fail_load"):
            raise FileNotFoundError(f"no weights at {os.path.join(local_path, 'weights.bin')}")
        self.seconds_per_image = float(self.configuration.get("predict_seconds", 0.0))
        self.busy = threading.Lock()

    def prepare_item_func(self, item: dl.Item):
        image = np.asarray(Image.open(item.download(save_locally=False)).convert("RGB"))
        if min(image.shape[:2]) < 16:
            raise ValueError(f"the image is {image.shape[1]}x{image.shape[0]} px; this adapter needs at least 16 px a side")
        return image

    def predict(self, batch, **kwargs):
        if not self.busy.acquire(blocking=False):
            raise RuntimeError("predict was called from two threads at once")
        try:
            time.sleep(self.seconds_per_image * len(batch))
            corners = [tuple(int(v) for v in image[0, 0]) for image in batch]
            if (255, 0, 0) in corners:
                raise RuntimeError("a red image: this adapter fails on red images")
            collections = []
            for image in batch:
                height, width = image.shape[:2]
                collection = dl.AnnotationCollection()
                collection.add(
                    annotation_definition=dl.Box(left=0, top=0, right=width / 2, bottom=height / 2, label="quarter"),
                    model_info={"name": self.model_entity.name, "confidence": float(image.mean() / 255.0)},
                )
                collections.append(collection)
            if (0, 255, 0) in corners:
                return collections[:-1]
            if (0, 0, 255) in corners:
                return [{"boxes": []} for _ in batch]
            return collections
        finally:
            self.busy.release()
