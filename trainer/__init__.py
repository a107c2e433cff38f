"""The fastai-style lesson-2 workflow: data, augmentation, a pretrained ConvLearner, SGDR, TTA, export."""
