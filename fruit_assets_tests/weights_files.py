"""Writing MobileNetV2 weights files in the format of the keras.applications downloads, for tests."""

import h5py


def save_legacy_h5(model, path) -> None:
    """Weights-only legacy Keras .h5, the format of the keras.applications weight files."""
    from keras.src.legacy.saving import legacy_h5_format  # Keras 3 has no public writer for it

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
