// The model shapes `ssmtune init` can write: the released Mamba-1 sizes (REFERENCE.md §1) and a tiny
// one for the demo and the tests.
#pragma once
#include <string>
#include <vector>

#include "framework/mamba_config.h"

namespace ssmtune {

std::vector<std::string> model_size_names();
MambaConfig model_size(const std::string& name);  // Error naming the size and the known ones

}  // namespace ssmtune
