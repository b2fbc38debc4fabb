// Per-ISA CPU entry point of the guided DDIM step (see dispatch.h).
#pragma once

#include "cpu/dispatch.h"
#include "sgdm/guided_ddim_args.h"

SGDM_CPU_DECLARE(void, guided_ddim_step_kernel, (const ::sgdm::GuidedDdimArgs& args))
