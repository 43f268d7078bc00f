"""Wire formats shared by the node and the fleet. Imports nothing else from edgeos."""
