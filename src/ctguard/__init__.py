"""ctguard: detect CT-GAN medical deepfakes (injected or removed lung nodules) in chest CT."""

from __future__ import annotations

__version__ = "0.1.0"
