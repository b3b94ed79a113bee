#include <cblas.h>
/* Thread control (OpenBLAS extension); declared in cblas.h of OpenBLAS, repeated for clarity. */
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);
/* The kernel family OpenBLAS picked for this CPU ("Haswell", "SkylakeX", "Prescott", ...). */
char *openblas_get_corename(void);
