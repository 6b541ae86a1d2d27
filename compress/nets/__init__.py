"""Networks: the model zoo (torchvision, timm, CIFAR ResNets), pretrained weights in, our
weight files in and out (with pruned widths), and rebuilding the network an earlier stage held."""
