"""The shared evaluation protocol of self-supervised representations.

A frozen encoder (image -> flat feature vector) is scored on a labelled set
two ways, the metric keys of DESIGN.md:

- `linear_top1`: a linear probe. A multinomial logistic regression
  (scikit-learn, L-BFGS) is trained on the standardised frozen features of the
  probe's training split and scored on its test split, as in the linear
  evaluation of Zhang et al. (2016) / SimCLR / solo-learn.
- `knn_top1`: a weighted k-nearest-neighbour classifier on L2-normalised
  features: the k most cosine-similar training features vote for their class
  with weight exp(similarity / temperature), k=20, temperature=0.07, as in
  Wu et al. (2018), "Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination" (and solo-learn's kNN).

`KNNMonitor` is the online version: a Keras callback that writes `knn_top1`
into the epoch's logs, so it reaches `history.csv`, TensorBoard and the
best-checkpoint monitor.
"""

import weakref

import keras
import numpy as np
import tensorflow as tf

KNN_K = 20
KNN_TEMPERATURE = 0.07

# Each encoder's forward pass traced once and reused (by the kNN monitor every
# epoch): called eagerly batch by batch, a deep encoder spends most of its time
# in Python (csp_darknet, 5,050 64x64 crops: 14.5 s eager, 4.3 s traced).
# The function holds the encoder weakly, so the cache does not keep it alive.
_traced_forwards = weakref.WeakKeyDictionary()


def _traced_forward(encoder):
    if encoder not in _traced_forwards:
        reference = weakref.ref(encoder)
        _traced_forwards[encoder] = tf.function(lambda images: reference()(images, training=False),
                                                reduce_retracing=True)
    return _traced_forwards[encoder]


def extract_features(encoder, dataset):
    """Features of a frozen encoder over a batched `(image, label)` dataset.

    Returns:
        (features float32 [n, dim], labels int64 [n]).
    """
    forward = _traced_forward(encoder)
    features, labels = [], []
    for images, batch_labels in dataset:
        features.append(np.asarray(forward(images), dtype=np.float32))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    if not features:
        raise ValueError("extract_features: the dataset is empty")
    return np.concatenate(features).reshape(sum(len(f) for f in features), -1), np.concatenate(labels)


def l2_normalize(features, epsilon=1e-12):
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), epsilon)


def linear_top1(train_features, train_labels, test_features, test_labels, c=1.0, max_iter=1000):
    """Top-1 accuracy of a linear probe on frozen features.

    Features are standardised with the training split's mean and deviation,
    then a multinomial logistic regression (L2 penalty `1/c`) is fitted.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_features)
    probe = LogisticRegression(C=c, max_iter=max_iter)
    probe.fit(scaler.transform(train_features), train_labels)
    return float(np.mean(probe.predict(scaler.transform(test_features)) == np.asarray(test_labels)))


def knn_predict(train_features, train_labels, test_features, k=KNN_K, temperature=KNN_TEMPERATURE,
                num_classes=None, chunk=1024):
    """Weighted kNN class predictions on L2-normalised features."""
    bank = l2_normalize(train_features)
    queries = l2_normalize(test_features)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    num_classes = int(num_classes or train_labels.max() + 1)
    k = min(int(k), len(bank))
    predictions = []
    for start in range(0, len(queries), chunk):
        similarity = queries[start:start + chunk] @ bank.T                    # [q, n]
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]             # k nearest, unordered
        weights = np.exp(np.take_along_axis(similarity, top, axis=1) / temperature)
        votes = np.zeros((len(top), num_classes), dtype=np.float64)
        np.add.at(votes, (np.arange(len(top))[:, None], train_labels[top]), weights)
        predictions.append(np.argmax(votes, axis=1))
    return np.concatenate(predictions)


def knn_top1(train_features, train_labels, test_features, test_labels, k=KNN_K, temperature=KNN_TEMPERATURE):
    """Top-1 accuracy of the weighted kNN classifier (k=20, T=0.07)."""
    predicted = knn_predict(train_features, train_labels, test_features, k, temperature)
    return float(np.mean(predicted == np.asarray(test_labels)))


def encoder_of(model):
    """The frozen-feature part of a model: its `encoder` (self-supervised
    methods) or `feature_extractor` (DANN), or the model itself."""
    for attribute in ("encoder", "feature_extractor"):
        if isinstance(getattr(model, attribute, None), keras.Model):
            return getattr(model, attribute)
    return model


def probe_encoder_of(model):
    """What the protocol scores and `embed_image` exports: the model's own
    `probe_encoder()` when it has one (context prediction can read an image
    as its grid of patches), else `encoder_of(model)`. Transfer
    (`backbone.from_run`) takes `encoder_of`, the bare encoder."""
    probe_encoder = getattr(model, "probe_encoder", None)
    return probe_encoder() if callable(probe_encoder) else encoder_of(model)


def representation_metrics(encoder, probe_train, probe_test, k=KNN_K, temperature=KNN_TEMPERATURE):
    """`{"linear_top1", "knn_top1"}` of a frozen encoder on a labelled probe split."""
    train_features, train_labels = extract_features(encoder, probe_train)
    test_features, test_labels = extract_features(encoder, probe_test)
    return {
        "linear_top1": linear_top1(train_features, train_labels, test_features, test_labels),
        "knn_top1": knn_top1(train_features, train_labels, test_features, test_labels, k, temperature),
    }


def label_budget_metrics(encoder, probe_train, probe_test, budgets=(1, 3, 10, None), draws=3):
    """The protocol at several label budgets, on features extracted once.

    For each budget (labelled images per class; None = every label of
    `probe_train`) the linear probe and kNN are fitted on `draws`
    class-balanced subsets (drawn with seeds 0..draws-1) and their scores
    averaged: with a few labels per class, which images are labelled moves
    the score by several points.

    Returns:
        {budget: {"linear_top1": mean, "knn_top1": mean}}.
    """
    from vislearn.data.unlabelled import labelled_subset

    train_features, train_labels = extract_features(encoder, probe_train)
    test_features, test_labels = extract_features(encoder, probe_test)
    results = {}
    for budget in budgets:
        subsets = ([labelled_subset(train_labels, int(budget), draw) for draw in range(draws)]
                   if budget else [np.arange(len(train_labels))])
        scores = [(linear_top1(train_features[keep], train_labels[keep], test_features, test_labels),
                   knn_top1(train_features[keep], train_labels[keep], test_features, test_labels))
                  for keep in subsets]
        results[budget] = {"linear_top1": float(np.mean([linear for linear, _ in scores])),
                           "knn_top1": float(np.mean([knn for _, knn in scores]))}
    return results


class KNNMonitor(keras.callbacks.Callback):
    """Writes the weighted-kNN top-1 accuracy of the model's encoder into the
    epoch logs (key `knn_top1`), so CSVLogger, TensorBoard and ModelCheckpoint
    placed after it see it.

    Args:
        probe_train: batched `(image, label)` dataset: the kNN memory bank.
        probe_test: batched `(image, label)` dataset that is classified.
        k: number of neighbours (20).
        temperature: vote weight temperature (0.07).
        every: evaluate every `every` epochs (and always after the last one).
        name: the log key.
    """

    def __init__(self, probe_train, probe_test, k=KNN_K, temperature=KNN_TEMPERATURE, every=1, name="knn_top1"):
        super().__init__()
        self.probe_train = probe_train
        self.probe_test = probe_test
        self.k = k
        self.temperature = temperature
        self.every = max(int(every), 1)
        self.name = name

    def on_epoch_end(self, epoch, logs=None):
        last = self.params and epoch + 1 == self.params.get("epochs")
        if logs is None or ((epoch + 1) % self.every and not last):
            return
        encoder = probe_encoder_of(self.model)
        train_features, train_labels = extract_features(encoder, self.probe_train)
        test_features, test_labels = extract_features(encoder, self.probe_test)
        logs[self.name] = knn_top1(train_features, train_labels, test_features, test_labels,
                                   self.k, self.temperature)
