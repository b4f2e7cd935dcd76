"""tf.data readers and the datasets the project makes.

`DATASETS` is the one name -> builder mapping a recipe's `data.name` uses.
Builders take `seed` (the recipe's `train.seed`) and, for domain adaptation,
`target_as_source`; vislearn fills both in.
"""

from vislearn.data.captions import captioned_shapes, coco_captions, karpathy_captions
from vislearn.data.detection_sets import detection_folder, shapes_on_photos
from vislearn.data.domains import digits_m, domain_folders, domain_tfds
from vislearn.data.unlabelled import digits_ssl, image_folders, object_crops

DATASETS = {
    "digits_m": digits_m,
    "domain_folders": domain_folders,
    "domain_tfds": domain_tfds,
    "detection_folder": detection_folder,
    "shapes_on_photos": shapes_on_photos,
    "digits_ssl": digits_ssl,
    "image_folders": image_folders,
    "object_crops": object_crops,
    "captioned_shapes": captioned_shapes,
    "karpathy_captions": karpathy_captions,
    "coco_captions": coco_captions,
}
