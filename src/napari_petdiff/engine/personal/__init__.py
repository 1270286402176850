"""Personalised priors: a shipped prior fine-tuned on pseudo-PETs registered to one subject's MR."""
from .pipeline import STAGES, PersonaliseConfig, personalise
from .pseudo import add_random_lesions, dirichlet_weights, normalise_pet, pseudo_pet
from .registration import RegistrationConfig, register
from .subjects import Subject, folder_subjects, load_subjects, phantom_subjects

__all__ = ["PersonaliseConfig", "personalise", "STAGES", "RegistrationConfig", "register", "dirichlet_weights", "add_random_lesions",
           "normalise_pet", "pseudo_pet", "Subject", "load_subjects", "phantom_subjects", "folder_subjects"]
