"""A torchvision Faster R-CNN adapter, written the way Dataloop's Faster R-CNN app writes one.

Plain dtlpy: ``load`` builds the torchvision model from the configuration and
the model's labels and loads the weights file the configuration names;
``prepare_item_func`` downloads the item and makes a tensor; ``predict`` runs
the whole batch through the model in one call and writes ``dl.Box``
annotations above ``conf_threshold``. Nothing here knows detserve.
"""

import logging
import os

import dtlpy as dl
import numpy as np
import torch
import torchvision
from PIL import Image

logger = logging.getLogger("FasterRCNNAdapter")


class FasterRCNNAdapter(dl.BaseModelAdapter):
    def load(self, local_path, **kwargs):
        arch = self.configuration.get("arch", "fasterrcnn_mobilenet_v3_large_320_fpn")
        input_size = self.configuration.get("input_size", 320)
        weights_filename = os.path.join(local_path, self.configuration.get("weights_filename", "weights/best.pth"))
        num_classes = len(self.model_entity.labels) + 1  # torchvision: label 0 is background

        self.model = getattr(torchvision.models.detection, arch)(
            weights=None, weights_backbone=None, num_classes=num_classes, min_size=input_size, max_size=input_size
        )
        checkpoint = torch.load(weights_filename, map_location="cpu", weights_only=True)
        state_dict = checkpoint.get("state_dict", checkpoint)
        self.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
        self.model.eval()
        logger.info(f"Loaded {arch} with {num_classes} classes from {weights_filename}")

    def prepare_item_func(self, item: dl.Item):
        buffer = item.download(save_locally=False)
        image = np.asarray(Image.open(buffer).convert("RGB"))
        return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255.0

    @torch.no_grad()
    def predict(self, batch, **kwargs):
        conf_threshold = self.configuration.get("conf_threshold", 0.5)
        id_to_label_map = self.configuration["id_to_label_map"]
        results = self.model(list(batch))
        batch_annotations = list()
        for result in results:
            image_annotations = dl.AnnotationCollection()
            for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist()):
                if score < conf_threshold:
                    continue
                left, top, right, bottom = box
                image_annotations.add(
                    annotation_definition=dl.Box(left=left, top=top, right=right, bottom=bottom, label=id_to_label_map[str(label)]),
                    model_info={"name": self.model_entity.name, "model_id": self.model_entity.id, "confidence": score},
                )
            batch_annotations.append(image_annotations)
        return batch_annotations
