"""Classification and domain-adaptation metrics (keys as in DESIGN.md)."""

import numpy as np


def accuracy(model, dataset):
    """Top-1 accuracy of `model(images)` over a batched `(image, label)` dataset."""
    correct = total = 0
    for images, labels in dataset:
        predicted = np.argmax(model(images, training=False), axis=-1)
        correct += int(np.sum(predicted == labels.numpy()))
        total += len(predicted)
    return correct / max(total, 1)


def domain_accuracy(model, source, target):
    """Accuracy of the domain classifier on source (label 0) and target (label 1)
    test images; 0.5 means the features do not reveal the domain."""
    correct = total = 0
    for dataset, domain in ((source, 0), (target, 1)):
        for images, _ in dataset:
            guess = (np.asarray(model.domain_logits(images)) > 0).astype(int)
            correct += int(np.sum(guess == domain))
            total += len(guess)
    return correct / max(total, 1)


def domain_adaptation_metrics(model, data):
    return {
        "accuracy": accuracy(model, data.target_test),
        "source_accuracy": accuracy(model, data.source_test),
        "domain_accuracy": domain_accuracy(model, data.source_test, data.target_test),
    }
