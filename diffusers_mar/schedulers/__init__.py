from diffusers_mar.schedulers.scheduling_ddpm_mar import MARDDPMScheduler

__all__ = ["MARDDPMScheduler"]
