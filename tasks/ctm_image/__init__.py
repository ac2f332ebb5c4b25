"""CTM image classification: ImageNet-1K, CIFAR-10/100, scikit-learn digits.

Config: configs/ctm_image.py (task name `ctm_image`).
"""
