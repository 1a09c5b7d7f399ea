"""The DICOM node (``ctguard node``): screens every CT series between the scanner and the PACS."""

from ctguard.node.service import Destination, Node, NodeConfig

__all__ = ["Destination", "Node", "NodeConfig"]
