/*
 * The C API from a plain C program, linked against libcgd.so: three Adam steps on a two-element parameter,
 * checked against values worked out by hand, and one rejected call. Exit status 0 means all held.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cgd.h"

int main(void) {
    float param[2] = {1.0f, -2.0f};
    float grad[2] = {0.5f, -0.25f};
    float exp_avg[2] = {0.0f, 0.0f}, exp_avg_sq[2] = {0.0f, 0.0f};
    double step = 0.0;
    cgd_diag_tensor t = {param, grad, exp_avg, exp_avg_sq, &step, 2};
    cgd_diag_hparams adam = {0};
    adam.lr = 0.1;
    adam.beta1 = 0.9;
    adam.beta2 = 0.999;
    adam.grad_weight = 1.0 - adam.beta1;
    adam.power = 0.5;
    adam.eps = 1e-8;
    adam.moment = CGD_MOMENT_RAW;
    adam.bias_correction = 1;

    printf("torch-cgd %s\n", cgd_version());
    for (int i = 0; i < 3; ++i) {
        cgd_status st = cgd_diag_step(&adam, CGD_FLOAT32, &t, 1, NULL, NULL, CGD_CPU, NULL);
        if (st != CGD_OK) {
            fprintf(stderr, "step failed: %s: %s\n", cgd_status_name(st), cgd_last_error());
            return 1;
        }
    }
    /* With a constant gradient, bias-corrected Adam moves each coordinate by lr * sign(g) per step (up to eps). */
    printf("param after 3 steps: %.6f %.6f (step counter %.0f)\n", param[0], param[1], step);
    if (fabsf(param[0] - 0.7f) > 1e-5f || fabsf(param[1] + 1.7f) > 1e-5f || step != 3.0) {
        fprintf(stderr, "unexpected result\n");
        return 1;
    }

    adam.power = 2.0;
    cgd_status st = cgd_diag_step(&adam, CGD_FLOAT32, &t, 1, NULL, NULL, CGD_CPU, NULL);
    printf("power = 2 -> %s: %s\n", cgd_status_name(st), cgd_last_error());
    if (st != CGD_ERR_INVALID_ARGUMENT || strstr(cgd_last_error(), "hparams.power = 2") == NULL) return 1;
    return 0;
}
