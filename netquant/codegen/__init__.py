"""Code generation: Program planning, printers (C; CUDA builds on it), build and load helpers."""
from .build import BuildError, CompiledNetwork, Generated, build, generate, load
from .program import CodegenError, Program, plan

__all__ = ["BuildError", "CompiledNetwork", "Generated", "build", "generate", "load", "CodegenError", "Program", "plan"]
