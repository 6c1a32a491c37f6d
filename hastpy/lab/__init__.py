"""The two-node network-namespace lab (``hastpy-lab``): node-a and node-b on a bridge in hast-sw.

``Lab(labdir).up()`` / ``.down()`` / ``.run(node, argv)`` / ``.spawn(node, argv)`` /
``.controller(argv)`` / ``.kill(node)`` / ``.cut(node)`` / ``.heal(node)`` / ``.status()``;
``topology`` holds the names, addresses, paths and command lists.
"""

from hastpy.lab.lab import Lab, LabCommandError, LabError
from hastpy.lab.topology import CONTROLLER_IP, NODES, SWITCH_NS, VIP, Node, Paths

__all__ = ["CONTROLLER_IP", "Lab", "LabCommandError", "LabError", "NODES", "Node", "Paths",
           "SWITCH_NS", "VIP"]
