"""tf.data readers and the datasets the project makes.

`DATASETS` is the one name -> builder mapping a recipe's `data.name` uses.
Builders take `seed` (the recipe's `train.seed`) and, for domain adaptation,
`target_as_source`; vislearn fills both in.
"""

from vislearn.data.domains import digits_m, domain_folders, domain_tfds

DATASETS = {
    "digits_m": digits_m,
    "domain_folders": domain_folders,
    "domain_tfds": domain_tfds,
}
