import dtlpy as dl
import torch
from ultralytics import YOLO
from PIL import Image
import os
import logging

logger = logging.getLogger('YOLOv20Adapter')

class Adapter(dl.BaseModelAdapter):

    def load(self, local_path, **kwargs):
        weights_filename = self.configuration.get('weights_filename', 'yolo20n.pt')
        model_filepath = os.path.join(local_path, weights_filename)
        
        # The YOLO class from ultralytics automatically handles downloads if the file doesn't exist
        self.model = YOLO(model_filepath)
        self.logger.info(f"Model loaded from {model_filepath}")
        
    def prepare_item_func(self, item: dl.Item):
        """
        This function is used to prepare an item for prediction.
        For our use case, we will use the item.download function to download the item and return a PIL image.
        """
        buffer = item.download(save_locally=False)
        image = Image.open(buffer).convert('RGB')
        return image
    
    def predict(self, batch, **kwargs):
        """
        Run inference on a batch of items.
        """
        logger.info(f'Predicting batch of size: {len(batch)}')
        batch_annotations = []
        for image in batch: # Batch is a list of PIL images from the prepare_item_func
            # YOLO model can take PIL image directly
            results = self.model(image)
            collection = dl.AnnotationCollection()
            
            # Process results for a single image
            for result in results:
                if result.boxes:
                    for box in result.boxes:
                        # Extract box coordinates, class, and confidence
                        left, top, right, bottom = box.xyxy[0].tolist()
                        confidence = box.conf[0].item()
                        label_id = int(box.cls[0].item())
                        label = self.model.names[label_id]
                        
                        # Add a box annotation to the collection
                        collection.add(
                            annotation_definition=dl.Box(
                                top=top,
                                left=left,
                                bottom=bottom,
                                right=right,
                                label=label
                            ),
                            model_info={
                                'name': self.model_entity.name,
                                'confidence': confidence
                            }
                        )
            
            batch_annotations.append(collection)
            
        return batch_annotations
