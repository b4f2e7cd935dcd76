"""Train-step timing for the throughput benchmarks.

`model.fit` can return up to a few seconds after its last step (tf.data
tears its iterator down on its own schedule; on the 2-core machine a run's
wall time came out in multiples of ~2.55 s), which swamps runs of a few
seconds. `timed_steps` times only the steps: from the first batch's start
to the last batch's end, as Keras callbacks see them.
"""

import time


def timed_steps(model, dataset, steps):
    """Fit `steps` steps of `dataset`; returns the seconds the steps took."""
    import keras

    class StepClock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.end = time.perf_counter()

    clock = StepClock()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[clock])
    return clock.end - clock.start
