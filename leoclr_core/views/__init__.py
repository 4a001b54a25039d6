"""The augmented views: per image with torchvision v2 on CPU workers (`transforms`), or a whole batch at once
as tensor ops, on the GPU or CPU (`batched`). Both draw from the same distributions."""
