"""The networks and the method: backbones and heads (`model`), the contrastive losses (`losses`), LeOCLR and
MoCo-v2 as small declarations over one momentum base (`methods`), and the torch.distributed collectives they
use (`collectives`). Plain PyTorch."""
