"""dpnet's models written in PyTorch, layer for layer: the yardstick of the benchmarks and the
models tests/test_export.py loads dpnet's exported parameters into (the names match
`python -m dpnet.export`'s). Needs torch; dpnet itself never imports this.

- ThreeLayer: conv 7x7 (pad 3) - [BN] - ReLU - max pool 2 - linear - [BN] - ReLU - linear;
- VGG: stages of conv 3x3 (pad 1) - BN - ReLU, a max pool 2 after each stage, then linear - BN -
  ReLU - linear (dpnet's ConvNet with one hidden layer);
- CifarResNet: dpnet's ResNet (He et al. 2016, section 4.2): no conv biases, option-A shortcuts
  (every other pixel, channels zero-padded half before, half after), global average pooling.
"""

import torch
from torch import nn
from torch.nn import functional as F


class ThreeLayer(nn.Module):
    def __init__(self, filters, hidden, bn, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, filters, 7, padding=3)
        self.bn1 = nn.BatchNorm2d(filters) if bn else nn.Identity()
        self.fc2 = nn.Linear(filters * 16 * 16, hidden)
        self.bn2 = nn.BatchNorm1d(hidden) if bn else nn.Identity()
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        return self.fc3(F.relu(self.bn2(self.fc2(torch.flatten(x, 1)))))


class VGG(nn.Module):
    def __init__(self, stages, hidden, classes=10):
        super().__init__()
        self.pools, c, i = [], 3, 0
        for stage in stages:
            for j, f in enumerate(stage):
                i += 1
                setattr(self, f"conv{i}", nn.Conv2d(c, f, 3, padding=1))
                setattr(self, f"bn{i}", nn.BatchNorm2d(f))
                self.pools.append(j == len(stage) - 1)
                c = f
        self.convs, size = i, 32 // 2 ** len(stages)
        setattr(self, f"fc{i + 1}", nn.Linear(c * size * size, hidden))
        setattr(self, f"bn{i + 1}", nn.BatchNorm1d(hidden))
        setattr(self, f"fc{i + 2}", nn.Linear(hidden, classes))

    def forward(self, x):
        for i in range(1, self.convs + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if self.pools[i - 1]:
                x = F.max_pool2d(x, 2)
        i = self.convs + 1
        x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"fc{i}")(torch.flatten(x, 1))))
        return getattr(self, f"fc{i + 1}")(x)


class Block(nn.Module):
    def __init__(self, c, f, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c, f, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(f)
        self.conv2 = nn.Conv2d(f, f, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(f)
        self.stride, self.pad = stride, ((f - c) // 2, f - c - (f - c) // 2)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x
        if self.stride != 1 or self.pad != (0, 0):  # option A: subsample, zero-pad the channels
            shortcut = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, *self.pad))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth, widths=(16, 32, 64), classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c = widths[0]
        for s, f in enumerate(widths):
            blocks = []
            for k in range(n):
                blocks.append(Block(c, f, 2 if s > 0 and k == 0 else 1))
                c = f
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))
