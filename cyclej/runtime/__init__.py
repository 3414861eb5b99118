"""What every part runs on: the artifact store, devices, N ranks (torch.distributed), fault
injection and progress bars."""
