#include "data/token_dataset.h"
